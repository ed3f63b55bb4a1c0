'use strict';
/*
 * The signed entry (common/vfed/common/trust/entries.py): `{"v": 1, "kind", "body", "sigs": [{"key_id",
 * "sig"}]}` with the same limits as Python's `SignedEntry.parse`. What is signed is
 * "vfed/entry/v1\0" + kind + "\0" + canonical(body); the digest is its SHA-256; the chain links the
 * SHA-256 of the whole entry's canonical JSON (`to_json`, signatures included).
 *
 * Forms Python coerces (`"v": "1"`, a key id in another type) are refused here: stricter than Python, never
 * laxer, so nothing this chaincode accepts is refused by a Python verifier reading the ledger.
 */

const crypto = require('node:crypto');
const { CanonicalError, canonical, parseJson } = require('./canonical');
const { verifySignature } = require('./keys');

const MAX_ENTRY_BYTES = 1 << 20;
const MAX_SIGS = 8;
const SIGN_DOMAIN = Buffer.from('vfed/entry/v1\0', 'latin1');
const KEY_ID = /^[0-9a-f]{32}$/;

class MalformedEntry extends Error {}

function codePoints(s) {
  let n = 0;
  for (const _ of s) n += 1;
  return n;
}

function ownKeys(obj) {
  return Object.keys(obj);
}

function isObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function parseSig(item, i) {
  if (!isObject(item)) throw new MalformedEntry(`not a signed entry (sigs.${i}: not an object)`);
  for (const key of ownKeys(item)) {
    if (key !== 'key_id' && key !== 'sig')
      throw new MalformedEntry(`not a signed entry (sigs.${i}.${key}: not permitted)`);
  }
  if (typeof item.key_id !== 'string' || !KEY_ID.test(item.key_id)) {
    throw new MalformedEntry(`not a signed entry (sigs.${i}.key_id: 32 lower-case hex digits)`);
  }
  // Python checks only the length here; a signature that is not base64 of 64 bytes never verifies.
  if (typeof item.sig !== 'string' || codePoints(item.sig) < 86 || codePoints(item.sig) > 88) {
    throw new MalformedEntry(`not a signed entry (sigs.${i}.sig: 86 to 88 characters)`);
  }
  return { key_id: item.key_id, sig: item.sig };
}

/** A signed entry from untrusted JSON text: {kind, body, sigs, message, digest, json}; MalformedEntry. */
function parseEntry(text) {
  if (typeof text !== 'string') throw new MalformedEntry('an entry is JSON text');
  if (Buffer.byteLength(text, 'utf8') > MAX_ENTRY_BYTES) {
    throw new MalformedEntry(`entry larger than ${MAX_ENTRY_BYTES} bytes`);
  }
  let raw;
  try {
    raw = parseJson(text);
  } catch (exc) {
    if (exc instanceof CanonicalError) throw new MalformedEntry(`not a signed entry (${exc.message})`);
    throw exc;
  }
  if (!isObject(raw)) throw new MalformedEntry('not a signed entry (not an object)');
  for (const key of ownKeys(raw)) {
    if (!['v', 'kind', 'body', 'sigs'].includes(key))
      throw new MalformedEntry(`not a signed entry (${key}: not permitted)`);
  }
  const v = 'v' in raw ? raw.v : 1n;
  if (v !== 1n) throw new MalformedEntry('signed entry version must be the integer 1');
  const { kind, body } = raw;
  if (typeof kind !== 'string' || codePoints(kind) < 1 || codePoints(kind) > 64) {
    throw new MalformedEntry('not a signed entry (kind: a string of 1 to 64 characters)');
  }
  if (!isObject(body)) throw new MalformedEntry('not a signed entry (body: not an object)');
  const sigsRaw = 'sigs' in raw ? raw.sigs : [];
  if (!Array.isArray(sigsRaw) || sigsRaw.length > MAX_SIGS) {
    throw new MalformedEntry(`not a signed entry (sigs: a list of at most ${MAX_SIGS})`);
  }
  const sigs = sigsRaw.map(parseSig);
  let message;
  let json;
  try {
    message = Buffer.concat([
      SIGN_DOMAIN,
      Buffer.from(kind, 'utf8'),
      Buffer.from([0]),
      Buffer.from(canonical(body), 'utf8'),
    ]);
    json = canonical({ body, kind, sigs, v: 1n });
  } catch (exc) {
    if (exc instanceof CanonicalError) throw new MalformedEntry(`value has no canonical JSON form: ${exc.message}`);
    throw exc;
  }
  if (json.length > MAX_ENTRY_BYTES) throw new MalformedEntry(`the entry is larger than ${MAX_ENTRY_BYTES} bytes`);
  const digest = crypto.createHash('sha256').update(message).digest('hex');
  return { kind, body, sigs, message, digest, json };
}

/** Python's `signed_by`: the first signature carrying this key's id verifies. */
function signedBy(entry, key) {
  const sig = entry.sigs.find((s) => s.key_id === key.keyId);
  return sig !== undefined && verifySignature(key, entry.message, sig.sig);
}

module.exports = { MAX_ENTRY_BYTES, MalformedEntry, codePoints, isObject, parseEntry, signedBy };
