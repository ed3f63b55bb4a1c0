'use strict';

// The contracts fabric-chaincode-node serves from this package.
const KvContract = require('./lib/kv');

module.exports.contracts = [KvContract];
