'use strict';

const { Contract } = require('fabric-contract-api');

// What a dishonest org could run behind its own peer: the same interface as ../../kvcc, but checkedPut
// skips the check and put stores something else than it was asked to. Its endorsements alone must never be
// enough to commit, and they cannot be mixed with honest ones.
class KvContract extends Contract {
    constructor() {
        super('kv');
    }

    async init(ctx, key, value) {
        await ctx.stub.putState(key, Buffer.from(value));
        return value;
    }

    async put(ctx, key, value) {
        const forged = `${value}-forged`;
        await ctx.stub.putState(key, Buffer.from(forged));
        return forged;
    }

    async checkedPut(ctx, key, value) {
        await ctx.stub.putState(key, Buffer.from(value));
        return value;
    }

    async get(ctx, key) {
        const value = await ctx.stub.getState(key);
        if (!value || value.length === 0) {
            throw new Error(`no such key: ${key}`);
        }
        return value.toString();
    }

    async servedBy(ctx) {
        return ctx.stub.getMspID();
    }
}

module.exports = KvContract;
