'use strict';
/*
 * BLAKE2b (RFC 7693) with a digest size and personalization, as Python's `hashlib.blake2b(data,
 * digest_size=n, person=p)`: vfed's key ids and key-text checksums are made with it, and node:crypto offers
 * only unkeyed, unpersonalized blake2b512. Inputs here are small (64 bytes), so 64-bit BigInt arithmetic is
 * fast enough and keeps the code plain.
 */

const MASK = (1n << 64n) - 1n;
const IV = [
  0x6a09e667f3bcc908n,
  0xbb67ae8584caa73bn,
  0x3c6ef372fe94f82bn,
  0xa54ff53a5f1d36f1n,
  0x510e527fade682d1n,
  0x9b05688c2b3e6c1fn,
  0x1f83d9abfb41bd6bn,
  0x5be0cd19137e2179n,
];
const SIGMA = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
  [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
  [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
  [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
  [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
  [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
  [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
  [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
  [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
  [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
];
const BLOCK = 128;

function rotr(x, n) {
  return ((x >> n) | (x << (64n - n))) & MASK;
}

function mix(v, a, b, c, d, x, y) {
  v[a] = (v[a] + v[b] + x) & MASK;
  v[d] = rotr(v[d] ^ v[a], 32n);
  v[c] = (v[c] + v[d]) & MASK;
  v[b] = rotr(v[b] ^ v[c], 24n);
  v[a] = (v[a] + v[b] + y) & MASK;
  v[d] = rotr(v[d] ^ v[a], 16n);
  v[c] = (v[c] + v[d]) & MASK;
  v[b] = rotr(v[b] ^ v[c], 63n);
}

function compress(h, block, counter, last) {
  const m = [];
  for (let i = 0; i < 16; i += 1) m.push(block.readBigUInt64LE(i * 8));
  const v = [...h, ...IV];
  v[12] ^= counter & MASK;
  v[13] ^= counter >> 64n;
  if (last) v[14] ^= MASK;
  for (let round = 0; round < 12; round += 1) {
    const s = SIGMA[round % 10];
    mix(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    mix(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    mix(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    mix(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    mix(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    mix(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    mix(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    mix(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (let i = 0; i < 8; i += 1) h[i] ^= v[i] ^ v[i + 8];
}

/** BLAKE2b of `data` (Buffer), `size` bytes long (1..64), personalized with `person` (at most 16 bytes). */
function blake2b(data, size, person = Buffer.alloc(0)) {
  if (!(size >= 1 && size <= 64) || person.length > 16) {
    throw new RangeError('blake2b: digest size 1..64 and at most 16 bytes of personalization');
  }
  const params = Buffer.alloc(64);
  params[0] = size;
  params[2] = 1; // fanout
  params[3] = 1; // depth
  person.copy(params, 48);
  const h = IV.map((word, i) => word ^ params.readBigUInt64LE(i * 8));
  let offset = 0;
  while (data.length - offset > BLOCK) {
    compress(h, data.subarray(offset, offset + BLOCK), BigInt(offset + BLOCK), false);
    offset += BLOCK;
  }
  const last = Buffer.alloc(BLOCK);
  data.copy(last, 0, offset);
  compress(h, last, BigInt(data.length), true);
  const out = Buffer.alloc(64);
  h.forEach((word, i) => out.writeBigUInt64LE(word, i * 8));
  return out.subarray(0, size);
}

module.exports = { blake2b };
