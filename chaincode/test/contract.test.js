'use strict';
/* The contract's own rules: initialization, the endorser's clock, MSP anchoring, reads, lease queries. */

const assert = require('node:assert/strict');
const { test } = require('node:test');
const { LedgerContract } = require('../lib/contract');
const { KEYS } = require('../lib/ledger');
const { World } = require('./stub');
const { appendStep, ledgerFor, mainLedger, vectors } = require('./helpers');

const NOW = 1_800_000_000;

async function initialized(args = ['3', '{"Org1MSP":1,"Org2MSP":2}']) {
  const contract = new LedgerContract({ clock: () => NOW * 1000 });
  const world = new World();
  await world.invoke(contract, 'InitLedger', args, { timestampS: NOW });
  return { contract, world };
}

test('InitLedger runs once, and nothing else runs before it', async () => {
  const contract = new LedgerContract({ clock: () => NOW * 1000 });
  const world = new World();
  await assert.rejects(world.invoke(contract, 'Head', [], { timestampS: NOW }), /not initialized/);
  await assert.rejects(world.invoke(contract, 'Append', ['{}'], { timestampS: NOW }), /not initialized/);
  const meta = JSON.parse(
    await world.invoke(contract, 'InitLedger', ['3', '{"Org1MSP":1}', '60'], { timestampS: NOW }),
  );
  assert.deepEqual(meta, { collaborationId: 3, orgs: { Org1MSP: 1 }, skewS: 60 });
  await assert.rejects(
    world.invoke(contract, 'InitLedger', ['4', '{"Org1MSP":1}'], { timestampS: NOW }),
    /initialized already/,
  );
  assert.deepEqual(JSON.parse(await world.invoke(contract, 'Head', [], { timestampS: NOW })), {
    seq: 0,
    hash: '0'.repeat(64),
  });
});

test('InitLedger refuses bad arguments with one clear message each', async () => {
  const bad = [
    [['3'], /takes collaborationId, orgsJson/],
    [['0', '{"A":1}'], /collaborationId must be a whole number of at least 1/],
    [['x', '{"A":1}'], /collaborationId/],
    [['3', 'not json'], /orgsJson is not JSON/],
    [['3', '{}'], /at least one MSP/],
    [['3', '[1]'], /must be an object/],
    [['3', '{"A":1,"B":1}'], /named for two MSPs/],
    [['3', '{"A":-1}'], /positive integer/],
    [['3', '{"A":1.0}'], /positive integer/],
    [['3', '{"A":1}', '0'], /skewS/],
    [['3', '{"A":1}', '86401'], /at most 86400/],
  ];
  for (const [args, message] of bad) {
    const world = new World();
    const contract = new LedgerContract({ clock: () => NOW * 1000 });
    await assert.rejects(
      world.invoke(contract, 'InitLedger', args, { timestampS: NOW }),
      message,
      JSON.stringify(args),
    );
    assert.equal(world.state.size, 0);
  }
});

test("a transaction whose timestamp is off the endorser's clock by more than the skew is refused", async () => {
  const { contract, world } = await initialized();
  for (const offset of [301, -301, 5000]) {
    await assert.rejects(
      world.invoke(contract, 'Head', [], { timestampS: NOW + offset }),
      /more than 300 s from this endorser's clock/,
    );
  }
  for (const offset of [299, -299, 0.5]) {
    await world.invoke(contract, 'Head', [], { timestampS: NOW + offset });
  }
  const tight = await initialized(['3', '{"Org1MSP":1}', '10']);
  await assert.rejects(tight.world.invoke(tight.contract, 'Head', [], { timestampS: NOW + 11 }), /more than 10 s/);
  await tight.world.invoke(tight.contract, 'Head', [], { timestampS: NOW + 9 });
});

test('an append with a skewed timestamp is refused and leaves nothing behind', async () => {
  const main = vectors().sequences.find((s) => s.name === 'main');
  const ledger = await ledgerFor(main);
  const before = new Map(ledger.world.state);
  await assert.rejects(ledger.invoke('Append', [main.steps[0].entry], { timeS: main.now + 400 }), /endorser's clock/);
  assert.deepEqual(ledger.world.state, before);
  const done = await appendStep(ledger, main.steps[0]);
  assert.ok(done.ok);
});

test("an organization's key records come only from its own MSP", async () => {
  const main = vectors().sequences.find((s) => s.name === 'main');
  const ledger = await ledgerFor(main);
  const genesis1 = main.steps[0];
  for (const msp of ['Org2MSP', 'OrdererMSP', '']) {
    const before = new Map(ledger.world.state);
    const done = await appendStep(ledger, { ...genesis1, msp });
    assert.ok(!done.ok, msp);
    assert.match(done.error.message, /key records of organization 1 are submitted by a client of MSP Org1MSP/);
    assert.deepEqual(ledger.world.state, before);
  }
  assert.ok((await appendStep(ledger, genesis1)).ok);
  // other entries are authorized by their signatures, whoever submits them
  assert.ok((await appendStep(ledger, { ...main.steps[2], msp: 'Org2MSP' })).ok);
});

test('Read pages through the ledger, the last entry included', async () => {
  const { ledger, accepted } = await mainLedger();
  const n = accepted.length;
  assert.ok(n > 15);
  const seqs = async (after, limit) =>
    JSON.parse(await ledger.invoke('Read', [after, limit])).entries.map((e) => e.seq);
  assert.deepEqual(await seqs('0', '3'), [1, 2, 3]);
  assert.deepEqual(await seqs('3', '3'), [4, 5, 6]);
  assert.deepEqual(await seqs(String(n - 1), '10'), [n]);
  assert.deepEqual(await seqs(String(n), '10'), []);
  let after = 0;
  const all = [];
  for (;;) {
    const page = await seqs(String(after), '7');
    if (page.length === 0) break;
    all.push(...page);
    after = page[page.length - 1];
  }
  assert.deepEqual(
    all,
    Array.from({ length: n }, (_, i) => i + 1),
  );
  assert.deepEqual(JSON.parse(await ledger.invoke('Read', ['0'])).entries.length, n);
  for (const args of [['-1', '5'], ['x', '5'], ['0', '0'], ['0', '1.5'], [], ['0', '1', '2']]) {
    await assert.rejects(ledger.invoke('Read', args), /after|limit|Read takes/, JSON.stringify(args));
  }
});

test('Read gives at most 1000 records', async () => {
  const { contract, world } = await initialized();
  for (let seq = 1; seq <= 1005; seq += 1) {
    world.state.set(KEYS.record(seq), Buffer.from(`{"seq":${seq},"hash":"${'0'.repeat(64)}","entry":{}}`));
  }
  const read = async (after, limit) =>
    JSON.parse(await world.invoke(contract, 'Read', [after, limit], { timestampS: NOW })).entries;
  const first = await read('0', '5000');
  assert.equal(first.length, 1000);
  assert.equal(first[999].seq, 1000);
  assert.deepEqual(
    (await read('1000', '5000')).map((e) => e.seq),
    [1001, 1002, 1003, 1004, 1005],
  );
});

test("the lease indexes answer a dataset's and a grantee's leases with their current terms", async () => {
  const { ledger, main } = await mainLedger();
  const onDataset = JSON.parse(await ledger.invoke('LeasesOnDataset', ['1', 'patients'])).leases;
  assert.deepEqual(
    onDataset.map((x) => x.id),
    main.leases.map((x) => x.id),
  );
  const [first, second] = onDataset;
  assert.equal(first.status, 'active');
  assert.equal(first.expires_at, main.now + 7200);
  assert.equal(first.granted_expires_at, main.now + 3600);
  assert.deepEqual(first.images, [`sha256:${'ab'.repeat(32)}`]);
  assert.deepEqual(first.users, [7]);
  assert.equal(first.max_runs, 5);
  assert.equal(first.epsilon, 1.5);
  assert.equal(second.status, 'revoked');
  assert.equal(second.revoked.reason, 'study ended');
  assert.equal(second.epsilon, 1e-7);
  const forGrantee = JSON.parse(await ledger.invoke('LeasesForGrantee', ['2'])).leases;
  assert.deepEqual(forGrantee, onDataset);
  assert.deepEqual(JSON.parse(await ledger.invoke('LeasesForGrantee', ['1'])).leases, []);
  assert.deepEqual(JSON.parse(await ledger.invoke('LeasesOnDataset', ['1', 'other'])).leases, []);
  assert.deepEqual(JSON.parse(await ledger.invoke('LeasesOnDataset', ['2', 'patients'])).leases, []);
  const composite = [...ledger.world.state.keys()].filter((k) => k.startsWith('\u0000'));
  assert.equal(composite.filter((k) => k.startsWith('\u0000lease~dataset\u00001\u0000patients\u0000')).length, 2);
  assert.equal(composite.filter((k) => k.startsWith('\u0000lease~grantee\u00002\u0000')).length, 2);
  await assert.rejects(ledger.invoke('LeasesOnDataset', ['x', 'patients']), /owner must be a whole number/);
  await assert.rejects(ledger.invoke('LeasesOnDataset', ['1', '']), /label/);
  await assert.rejects(ledger.invoke('LeasesForGrantee', ['-2']), /org must be a whole number/);
});

test('a lease past its expiry reads as expired', async () => {
  const { ledger, main } = await mainLedger();
  ledger.clock.ms = (main.now + 7300) * 1000;
  const [first] = JSON.parse(await ledger.invoke('LeasesOnDataset', ['1', 'patients'])).leases;
  assert.equal(first.status, 'expired');
});

test('Append refuses what is not an entry with one clear message, and keeps nothing of it', async () => {
  const { ledger } = await mainLedger(5);
  const before = new Map(ledger.world.state);
  const cases = [
    ['', /not a signed entry/],
    ['[]', /not an object/],
    ['{"v":1,"kind":"x","body":{}', /not a signed entry/],
    [`{"v":1,"kind":"x","body":{"a":"${'y'.repeat(1 << 20)}"}}`, /larger than 1048576 bytes/],
    [
      '{"v":1,"kind":"dataset.registered","body":{"collab":3},"sigs":[]}',
      /dataset.registered.*malformed \(at: field required\)/,
    ],
  ];
  for (const [text, message] of cases) {
    await assert.rejects(ledger.invoke('Append', [text]), message);
  }
  assert.deepEqual(ledger.world.state, before);
});
