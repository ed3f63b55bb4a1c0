'use strict';
/* The chaincode agrees with the project's Python code on every vector test/make_vectors.py makes now. */

const assert = require('node:assert/strict');
const { test } = require('node:test');
const { blake2b } = require('../lib/blake2b');
const { MalformedEntry, parseEntry } = require('../lib/entry');
const { KeyError, parsePublicKey, verifySignature } = require('../lib/keys');
const { link } = require('../lib/ledger');
const { appendStep, ledgerFor, vectors } = require('./helpers');

test('canonical message, digest and entry JSON as Python makes them, and the same refusals', () => {
  const cases = vectors().canonical;
  assert.ok(cases.length > 30);
  for (const c of cases) {
    let entry = null;
    let refusal = null;
    try {
      entry = parseEntry(c.text);
    } catch (exc) {
      if (!(exc instanceof MalformedEntry)) throw exc;
      refusal = exc;
    }
    if (c.stricter) {
      assert.ok(c.ok, `${c.name}: Python accepts what the chaincode is stricter about`);
      assert.ok(refusal, `${c.name}: the chaincode refuses it (${c.stricter})`);
    } else if (c.ok) {
      assert.equal(refusal, null, `${c.name}: refused (${refusal && refusal.message})`);
      assert.equal(entry.message.toString('hex'), c.message_hex, `${c.name}: message`);
      assert.equal(entry.digest, c.digest, `${c.name}: digest`);
      assert.equal(entry.json, c.json, `${c.name}: entry JSON`);
    } else {
      assert.ok(refusal, `${c.name}: Python refuses it (${c.error}) but the chaincode accepted it`);
    }
  }
});

test('key texts: the same key ids, the same refusals', () => {
  for (const c of vectors().keys) {
    if (c.ok) {
      assert.equal(parsePublicKey(c.text).keyId, c.key_id, c.name);
    } else {
      assert.throws(() => parsePublicKey(c.text), KeyError, `${c.name}: Python refuses it (${c.error})`);
    }
  }
});

test('signatures: the same verdicts, small-order R and S >= L included', () => {
  const cases = vectors().signatures;
  assert.deepEqual(
    cases.map((c) => c.ok),
    [true, false, false, false, false],
  );
  for (const c of cases) {
    const key = parsePublicKey(c.key);
    assert.equal(verifySignature(key, Buffer.from(c.message_hex, 'hex'), c.sig), c.ok, c.name);
  }
});

test('BLAKE2b with digest size and personalization as hashlib', () => {
  for (const c of vectors().blake2b) {
    const got = blake2b(Buffer.from(c.data_hex, 'hex'), c.size, Buffer.from(c.person_hex, 'hex'));
    assert.equal(got.toString('hex'), c.digest);
  }
});

test('chain links as chain.py, at the edges of the 64-bit numbers', () => {
  for (const c of vectors().link) {
    assert.equal(link(BigInt(c.collab), BigInt(c.seq), c.prev, c.json), c.hash);
  }
});

test('every ledger sequence: the verdict LedgerState gives, the same place and chain hash', async (t) => {
  const sequences = vectors().sequences;
  const verdicts = new Set();
  for (const sequence of sequences) {
    await t.test(sequence.name, async () => {
      const ledger = await ledgerFor(sequence);
      for (const step of sequence.steps) {
        const done = await appendStep(ledger, step);
        verdicts.add(`${step.python}/${step.chaincode}`);
        if (step.chaincode === 'accepted') {
          assert.ok(done.ok, `${step.name}: refused: ${done.error && done.error.message}`);
          assert.deepEqual(done.result, { seq: step.seq, hash: step.hash }, step.name);
        } else {
          assert.ok(!done.ok, `${step.name}: accepted, but ${step.stricter || `Python refuses it: ${step.error}`}`);
          assert.match(done.error.message, /\S/);
        }
      }
      const accepted = sequence.steps.filter((s) => s.chaincode === 'accepted');
      const text = await ledger.invoke('Read', ['0', '1000']);
      const read = JSON.parse(text);
      assert.deepEqual(
        read.entries.map((e) => [e.seq, e.hash]),
        accepted.map((s) => [s.seq, s.hash]),
      );
      for (const step of accepted) {
        // the entry exactly as Python's to_json writes it (numbers included), so a Python reader gets the same
        assert.ok(text.includes(`"hash":"${step.hash}","entry":${step.json}}`), `${step.name}: entry text as read`);
      }
      if (!sequence.steps.some((s) => s.stricter)) {
        const leases = JSON.parse(await ledger.invoke('LeasesOnDataset', ['1', 'patients'])).leases;
        const ours = leases.map((x) => ({
          id: x.id,
          seq: x.seq,
          grantee: x.grantee,
          expires_at: x.expires_at,
          revoked: x.revoked !== null,
          runs: x.runs,
          epsilon_spent: x.epsilon_spent,
          extensions: x.extensions.length,
        }));
        assert.deepEqual(ours, sequence.leases, 'leases as LedgerState says');
      }
      const head = JSON.parse(await ledger.invoke('Head', []));
      assert.equal(head.seq, accepted.length);
      if (accepted.length) assert.equal(head.hash, accepted[accepted.length - 1].hash);
    });
  }
  assert.deepEqual([...verdicts].sort(), ['accepted/accepted', 'accepted/rejected', 'rejected/rejected']);
});

test('one field changed at a time: the chaincode refuses whatever Python refuses', async () => {
  const { prefix, cases } = vectors().mutations;
  const ledger = await ledgerFor(prefix);
  for (const step of prefix.steps) assert.ok((await appendStep(ledger, step)).ok, step.name);
  const snapshot = new Map(ledger.world.state);
  let agreedAccepts = 0;
  for (const c of cases) {
    ledger.world.state = new Map(snapshot);
    const done = await appendStep(ledger, { entry: c.entry, msp: 'Org1MSP', time: prefix.now });
    if (c.python === 'rejected') {
      assert.ok(!done.ok, `${c.name}: accepted, but Python refuses it: ${c.error}`);
    } else if (!c.may_be_stricter) {
      assert.ok(done.ok, `${c.name}: refused (${done.error && done.error.message}), Python accepts it`);
      agreedAccepts += 1;
    }
  }
  assert.ok(cases.length > 500 && agreedAccepts > 40, `${cases.length} cases, ${agreedAccepts} accepted by both`);
});
