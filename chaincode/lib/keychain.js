'use strict';
/*
 * An organization's key chain as common/vfed/common/trust/keychain.py `verify_chain` checks it, without a
 * pinned first key (the chaincode anchors organizations by Fabric MSP instead, see contract.js): one
 * self-signed `key.genesis`, then `key.rotation`s each signed by the previous and the new key; two valid
 * rotations from one key are a fork and refused. The whole chain is verified again with each new record, as
 * Python does, so a record that only later joins the chain is judged then.
 */

const { KeyError, parsePublicKey } = require('./keys');
const { signedBy } = require('./entry');

const GENESIS = 'key.genesis';
const ROTATION = 'key.rotation';

class ChainError extends Error {}

function recordKey(entry) {
  const text = entry.body.key;
  if (typeof text !== 'string') throw new ChainError(`${entry.kind} record names no key`);
  try {
    return parsePublicKey(text);
  } catch (exc) {
    if (exc instanceof KeyError) throw new ChainError(`${entry.kind} record holds an unreadable key: ${exc.message}`);
    throw exc;
  }
}

function created(entry) {
  const value = entry.body.created_at;
  if (typeof value !== 'bigint' || value < 0n) throw new ChainError(`${entry.kind} record has no valid created_at`);
  return value;
}

function genesis(org, records) {
  const candidates = [];
  for (const entry of records) {
    if (entry.kind !== GENESIS) continue;
    const key = recordKey(entry);
    if (!signedBy(entry, key)) {
      throw new ChainError(`organization ${org}: first key record: the signature of key ${key.keyId} does not verify`);
    }
    candidates.push([key, entry]);
  }
  if (candidates.length === 0) throw new ChainError(`organization ${org} has published no key record`);
  if (candidates.length > 1) throw new ChainError(`organization ${org} has ${candidates.length} first-key records`);
  return candidates[0];
}

function rotation(prev, entry, org) {
  const key = recordKey(entry);
  if (!signedBy(entry, prev) || !signedBy(entry, key)) {
    throw new ChainError(
      `organization ${org}: rotation from key ${prev.keyId} does not verify (a rotation is signed by the previous and the new key)`,
    );
  }
  return key;
}

/** The keys of organization `org` (BigInt) from its records (parsed entries, in ledger order), oldest
 * first: [{keyId, text}]; ChainError when the records do not make one valid chain. */
function verifyChain(org, records) {
  const [first, firstEntry] = genesis(org, records);
  const byPrev = new Map();
  for (const entry of records) {
    if (entry.kind !== ROTATION) continue;
    const prev = entry.body.prev;
    if (entry.body.org !== org || typeof prev !== 'string') {
      throw new ChainError(`organization ${org}: a rotation record names another org or no key`);
    }
    if (!byPrev.has(prev)) byPrev.set(prev, []);
    byPrev.get(prev).push(entry);
  }
  created(firstEntry);
  let current = first;
  const keys = [first];
  const seen = new Set([first.keyId]);
  while (byPrev.has(current.keyId)) {
    const nexts = byPrev.get(current.keyId).map((entry) => [entry, rotation(current, entry, org)]);
    if (nexts.length > 1) {
      throw new ChainError(
        `organization ${org}: key ${current.keyId} signed ${nexts.length} different rotations (a fork: the key may be compromised)`,
      );
    }
    const [entry, next] = nexts[0];
    if (seen.has(next.keyId)) throw new ChainError(`organization ${org}: the key chain loops at ${next.keyId}`);
    seen.add(next.keyId);
    created(entry);
    keys.push(next);
    current = next;
  }
  return keys.map((k) => ({ keyId: k.keyId, text: k.text }));
}

module.exports = { ChainError, GENESIS, ROTATION, verifyChain };
