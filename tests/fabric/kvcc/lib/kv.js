'use strict';

const { Contract } = require('fabric-contract-api');

// A key-value store for the network fixture's tests. checkedPut is the rule an honest org enforces: a
// dishonest org's chaincode (../../kvcc_dishonest) skips it, and endorsement policy must keep its writes out.
class KvContract extends Contract {
    constructor() {
        super('kv');
    }

    async init(ctx, key, value) {
        await ctx.stub.putState(key, Buffer.from(value));
        return value;
    }

    async put(ctx, key, value) {
        await ctx.stub.putState(key, Buffer.from(value));
        return value;
    }

    async checkedPut(ctx, key, value) {
        if (!/^[0-9]+$/.test(value)) {
            throw new Error(`refused: ${JSON.stringify(value)} is not a non-negative integer`);
        }
        return this.put(ctx, key, value);
    }

    async get(ctx, key) {
        const value = await ctx.stub.getState(key);
        if (!value || value.length === 0) {
            throw new Error(`no such key: ${key}`);
        }
        return value.toString();
    }

    // Which org's server answered: each org's peer talks to its own chaincode server.
    async servedBy(ctx) {
        return ctx.stub.getMspID();
    }
}

module.exports = KvContract;
