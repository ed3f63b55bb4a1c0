'use strict';
/* The test stub behaves as fabric-shim's stub where the chaincode relies on it. */

const assert = require('node:assert/strict');
const { test } = require('node:test');
const { Stub, World } = require('./stub');

function stubWith(keys) {
  const world = new World();
  for (const key of keys) world.state.set(key, Buffer.from(key));
  return new Stub(world, { txId: 't', timestampS: 1.25 });
}

async function keysOf(iterable) {
  const out = [];
  for await (const item of iterable) out.push(item.key);
  return out;
}

test('range queries yield every row in the range, the last one included', async () => {
  const stub = stubWith(['a1', 'a2', 'a3', 'b1']);
  assert.deepEqual(await keysOf(stub.getStateByRange('a1', 'a3')), ['a1', 'a2']);
  assert.deepEqual(await keysOf(stub.getStateByRange('a1', 'b')), ['a1', 'a2', 'a3']);
  const it = await stub.getStateByRange('a', 'z');
  const rows = [];
  for (let r = await it.next(); !r.done; r = await it.next()) rows.push(r.value.key);
  await it.close();
  assert.deepEqual(rows, ['a1', 'a2', 'a3', 'b1']);
});

test('partial composite keys match whole attributes only', async () => {
  const stub = stubWith([]);
  const keys = [
    ['1', 'p', 'x'],
    ['1', 'p', 'y'],
    ['1', 'pp', 'z'],
    ['11', 'p', 'w'],
  ].map((a) => stub.createCompositeKey('t', a));
  for (const key of keys) stub.world.state.set(key, Buffer.from('1'));
  const found = await keysOf(stub.getStateByPartialCompositeKey('t', ['1', 'p']));
  assert.deepEqual(
    found.map((k) => stub.splitCompositeKey(k).attributes),
    [
      ['1', 'p', 'x'],
      ['1', 'p', 'y'],
    ],
  );
  assert.throws(() => stub.createCompositeKey('t', ['a\u0000b']));
});

test('writes are not read back before the transaction commits; the timestamp is a Long', async () => {
  const stub = stubWith([]);
  await stub.putState('k', Buffer.from('v'));
  assert.equal((await stub.getState('k')).length, 0);
  const ts = stub.getTxTimestamp();
  assert.equal(ts.seconds.toNumber(), 1);
  assert.equal(ts.nanos, 250000000);
  await assert.rejects(stub.putState('k', Buffer.alloc(0)));
});
