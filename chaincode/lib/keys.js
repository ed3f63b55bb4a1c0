'use strict';
/*
 * vfed public keys (common/vfed/common/crypto/keys.py): `vfedpk1:` + base64url(x25519 || ed25519 || 4-byte
 * checksum), the key id a personalized BLAKE2b of both halves, and Ed25519 signatures.
 *
 * Python refuses, through libsodium, an Ed25519 half that is not a canonical point of the prime-order
 * subgroup, an X25519 half of low order, and a signature whose R is a small-order point; OpenSSL (node:crypto)
 * checks none of these, so they are checked here, the curve arithmetic in BigInt (a few milliseconds a key).
 * Only the form `to_text` writes is read (no white space, no padding): stricter than Python, which a key
 * writer never notices.
 */

const crypto = require('node:crypto');
const { blake2b } = require('./blake2b');

const PREFIX = 'vfedpk1:';
const TEXT = /^vfedpk1:[A-Za-z0-9_-]{91}$/;
const SIG_TEXT = /^[A-Za-z0-9+/]{86}==$/;
const KEY_ID_PERSON = Buffer.from('vfed-key-id');
const CHECK_PERSON = Buffer.from('vfed-pk-check');

const P = (1n << 255n) - 19n;
const L = (1n << 252n) + 27742317777372353535851937790883648493n;

function mod(a) {
  const r = a % P;
  return r < 0n ? r + P : r;
}

function pow(base, exp) {
  let result = 1n;
  let b = mod(base);
  let e = exp;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % P;
    b = (b * b) % P;
    e >>= 1n;
  }
  return result;
}

const D = mod(-121665n * pow(121666n, P - 2n));
const SQRT_M1 = pow(2n, (P - 1n) / 4n);

/** The point with this y and sign of x (extended coordinates), or null when y has no point. */
function decompress(y, sign) {
  const yy = (y * y) % P;
  const u = mod(yy - 1n);
  const v = mod(D * yy + 1n);
  let x = (((u * pow(v, 3n)) % P) * pow((u * pow(v, 7n)) % P, (P - 5n) / 8n)) % P;
  const check = (v * x * x) % P;
  if (check === mod(-u)) x = (x * SQRT_M1) % P;
  else if (check !== u) return null;
  if ((x & 1n) !== BigInt(sign)) x = mod(-x);
  return [x, y, 1n, (x * y) % P];
}

function add(p, q) {
  const [x1, y1, z1, t1] = p;
  const [x2, y2, z2, t2] = q;
  const a = mod((y1 - x1) * (y2 - x2));
  const b = mod((y1 + x1) * (y2 + x2));
  const c = mod(2n * D * t1 * t2);
  const d = mod(2n * z1 * z2);
  const e = b - a;
  const f = d - c;
  const g = d + c;
  const h = b + a;
  return [mod(e * f), mod(g * h), mod(f * g), mod(e * h)];
}

function multiply(point, scalar) {
  let result = [0n, 1n, 1n, 0n];
  let q = point;
  let k = scalar;
  while (k > 0n) {
    if (k & 1n) result = add(result, q);
    q = add(q, q);
    k >>= 1n;
  }
  return result;
}

function isIdentity([x, y, z]) {
  return x === 0n && y === z;
}

function yOf(bytes) {
  const copy = Buffer.from(bytes);
  const sign = copy[31] >> 7;
  copy[31] &= 0x7f;
  return [BigInt(`0x${Buffer.from(copy).reverse().toString('hex')}`), sign];
}

/** libsodium's crypto_core_ed25519_is_valid_point: canonical, on the curve, not of small order, in the
 * prime-order subgroup. */
function isValidPoint(bytes) {
  const [y, sign] = yOf(bytes);
  if (y >= P) return false;
  const point = decompress(y, sign);
  if (point === null) return false;
  if (isIdentity(multiply(point, 8n))) return false;
  return isIdentity(multiply(point, L));
}

/** libsodium's refusal of a signature whose R encodes a point of small order (sign bit ignored). */
function isSmallOrderEncoding(bytes) {
  const [y] = yOf(bytes);
  const point = decompress(mod(y), 0);
  return point !== null && isIdentity(multiply(point, 8n));
}

const X25519_PROBE = crypto.createPrivateKey({
  key: { kty: 'OKP', crv: 'X25519', d: Buffer.alloc(32, 1).toString('base64url'), x: '' },
  format: 'jwk',
});

function isLowOrderX25519(raw) {
  // A low-order point makes every shared secret zero; OpenSSL refuses to derive it, as libsodium does.
  try {
    const publicKey = crypto.createPublicKey({
      key: { kty: 'OKP', crv: 'X25519', x: raw.toString('base64url') },
      format: 'jwk',
    });
    crypto.diffieHellman({ privateKey: X25519_PROBE, publicKey });
    return false;
  } catch {
    return true;
  }
}

class KeyError extends Error {}

/** A public key from its text: {keyId, text, ed25519 (KeyObject)}; KeyError naming what is wrong. */
function parsePublicKey(text) {
  if (typeof text !== 'string' || !TEXT.test(text)) {
    throw new KeyError(`a public key is ${PREFIX} and 91 characters of base64url`);
  }
  const blob = Buffer.from(text.slice(PREFIX.length), 'base64url');
  const raw = blob.subarray(0, 64);
  if (!blake2b(raw, 4, CHECK_PERSON).equals(blob.subarray(64, 68))) {
    throw new KeyError('public key text checksum mismatch (typo or truncation)');
  }
  const x25519 = raw.subarray(0, 32);
  const ed25519 = raw.subarray(32, 64);
  if (!isValidPoint(ed25519)) throw new KeyError('Ed25519 public key is not a valid curve point');
  if (isLowOrderX25519(x25519)) throw new KeyError('X25519 public key is a low-order point');
  const keyObject = crypto.createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: ed25519.toString('base64url') },
    format: 'jwk',
  });
  return { keyId: blake2b(raw, 16, KEY_ID_PERSON).toString('hex'), text, ed25519: keyObject };
}

/** Whether `sig` (base64 text as entries carry it) is this key's Ed25519 signature of `message`. */
function verifySignature(key, message, sig) {
  if (!SIG_TEXT.test(sig)) return false;
  const raw = Buffer.from(sig, 'base64');
  if (raw.length !== 64 || isSmallOrderEncoding(raw.subarray(0, 32))) return false;
  return crypto.verify(null, message, key.ed25519, raw);
}

module.exports = { KeyError, isValidPoint, parsePublicKey, verifySignature };
