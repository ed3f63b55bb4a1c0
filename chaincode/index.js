'use strict';
/* Entry point for fabric-chaincode-node (`start`, or `server` for chaincode as a service). */

const { LedgerContract } = require('./lib/contract');

module.exports.LedgerContract = LedgerContract;
module.exports.contracts = [LedgerContract];
