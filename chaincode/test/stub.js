'use strict';
/*
 * A stand-in for fabric-shim's ChaincodeStub and the contract's context, for unit tests. A fake because a
 * peer cannot run inside `node --test`; the Fabric network tests (tests/fabric) run this chaincode on real
 * peers. It keeps what the chaincode relies on: state as bytes sorted by key bytes (as the peer's LevelDB),
 * writes invisible to getState until the transaction commits (as endorsement reads committed state), a
 * rejected transaction leaving nothing behind, composite keys in fabric-shim's format, range iterators that
 * yield every row (the last one included), and the transaction's timestamp as a Long.
 */

const Long = require('long');

const NS = '\u0000';
const MAX_RUNE = '\u{10FFFF}';

function compare(a, b) {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/** A promise of an iterator (next/close) that is itself async-iterable, like fabric-shim's. */
function iterator(rows) {
  let index = 0;
  const it = {
    async next() {
      if (index >= rows.length) return { done: true, value: undefined };
      const row = rows[index];
      index += 1;
      return { done: false, value: { key: row[0], value: Buffer.from(row[1]) } };
    },
    async close() {
      index = rows.length;
    },
  };
  const promise = Promise.resolve(it);
  promise[Symbol.asyncIterator] = () => ({
    next: () => it.next(),
    return: async () => {
      await it.close();
      return { done: true, value: undefined };
    },
  });
  return promise;
}

class Stub {
  constructor(world, tx) {
    this.world = world;
    this.tx = tx;
    this.writes = new Map();
  }

  async getState(key) {
    const value = this.world.state.get(key);
    return value === undefined ? Buffer.alloc(0) : Buffer.from(value);
  }

  async putState(key, value) {
    if (typeof key !== 'string' || key.length === 0) throw new Error('key must be a non-empty string');
    if (!Buffer.isBuffer(value) || value.length === 0) throw new Error('putState takes a non-empty Buffer');
    this.writes.set(key, Buffer.from(value));
  }

  async deleteState(key) {
    this.writes.set(key, null);
  }

  createCompositeKey(objectType, attributes) {
    for (const part of [objectType, ...attributes]) {
      if (typeof part !== 'string' || part.includes(NS) || part.includes(MAX_RUNE)) {
        throw new Error(`invalid composite key attribute ${JSON.stringify(part)}`);
      }
    }
    return `${NS}${objectType}${NS}${attributes.map((a) => `${a}${NS}`).join('')}`;
  }

  splitCompositeKey(key) {
    const parts = key.slice(1).split(NS);
    parts.pop();
    return { objectType: parts[0], attributes: parts.slice(1) };
  }

  rows(start, end) {
    return [...this.world.state.entries()]
      .filter(([key]) => compare(key, start) >= 0 && compare(key, end) < 0)
      .sort((a, b) => compare(a[0], b[0]));
  }

  getStateByRange(startKey, endKey) {
    if (startKey.startsWith(NS) || endKey.startsWith(NS)) {
      return Promise.reject(new Error('getStateByRange takes simple keys, not composite ones'));
    }
    return iterator(this.rows(startKey, endKey).filter(([key]) => !key.startsWith(NS)));
  }

  getStateByPartialCompositeKey(objectType, attributes) {
    const prefix = this.createCompositeKey(objectType, attributes);
    return iterator(this.rows(prefix, prefix + MAX_RUNE));
  }

  getTxTimestamp() {
    const whole = Math.floor(this.tx.timestampS);
    return { seconds: Long.fromNumber(whole, true), nanos: Math.round((this.tx.timestampS - whole) * 1e9) };
  }

  getTxID() {
    return this.tx.txId;
  }

  getChannelID() {
    return this.world.channel;
  }
}

/** A channel's world state and a way to run transactions against it. */
class World {
  constructor(channel = 'vfed') {
    this.channel = channel;
    this.state = new Map();
    this.count = 0;
  }

  /** Run `contract[fn](ctx, ...args)` as client of `msp` at `timestampS`; its writes count only if it
   * returns. */
  async invoke(contract, fn, args, { msp = 'Org1MSP', timestampS = Date.now() / 1000 } = {}) {
    this.count += 1;
    const stub = new Stub(this, { txId: `tx${this.count}`, timestampS });
    const ctx = { stub, clientIdentity: { getMSPID: () => msp } };
    const result = await contract[fn](ctx, ...args);
    for (const [key, value] of stub.writes) {
      if (value === null) this.state.delete(key);
      else this.state.set(key, value);
    }
    return result;
  }
}

module.exports = { Stub, World };
