'use strict';
/* Canonical JSON on its own: Python's float repr, key order, escapes, and what the parser refuses. */

const assert = require('node:assert/strict');
const { test } = require('node:test');
const { CanonicalError, canonical, floatRepr, parseJson } = require('../lib/canonical');

test("floats print as Python's repr", () => {
  const cases = [
    [0.1, '0.1'],
    [1e-7, '1e-07'],
    [1e16, '1e+16'],
    [2.5, '2.5'],
    [1, '1.0'],
    [100, '100.0'],
    [-0, '-0.0'],
    [0, '0.0'],
    [1e15, '1000000000000000.0'],
    [0.0001, '0.0001'],
    [0.00001, '1e-05'],
    [123456789.123, '123456789.123'],
    [1.5e300, '1.5e+300'],
    [5e-324, '5e-324'],
    [-2.5e-5, '-2.5e-05'],
    [1.7976931348623157e308, '1.7976931348623157e+308'],
    [9007199254740993, '9007199254740992.0'],
    [12345678901234567890, '1.2345678901234567e+19'],
  ];
  for (const [value, text] of cases) assert.equal(floatRepr(value), text, String(value));
  assert.throws(() => floatRepr(Infinity), CanonicalError);
  assert.throws(() => floatRepr(NaN), CanonicalError);
});

test('ints and floats keep their kind, big ints their digits', () => {
  const value = parseJson('{"i":1,"f":1.0,"e":1e2,"big":123456789012345678901234567890,"neg":-0}');
  assert.equal(canonical(value), '{"big":123456789012345678901234567890,"e":100.0,"f":1.0,"i":1,"neg":0}');
  assert.equal(typeof value.i, 'bigint');
  assert.equal(typeof value.f, 'number');
});

test('keys sort by code point, not by UTF-16 unit', () => {
  // U+1F600 is stored as surrogates (0xD83D...) that sort before U+E000 in UTF-16, after it by code point.
  assert.equal(canonical(parseJson('{"\\ud83d\\ude00":1,"\\ue000":2,"a":3}')), '{"a":3,"\ue000":2,"\u{1F600}":1}');
});

test('strings escape as Python writes them', () => {
  assert.equal(
    canonical('\u0000\u0008\t\n\u000b\f\r\u001f"\\/\u007f\u2028é'),
    '"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f\\"\\\\/\u007f\u2028é"',
  );
  assert.throws(() => canonical('\ud800'), CanonicalError);
});

test('a key named __proto__ is data', () => {
  const value = parseJson('{"__proto__":{"x":1},"a":2}');
  assert.equal(canonical(value), '{"__proto__":{"x":1},"a":2}');
  assert.equal(Object.getPrototypeOf(value), null);
});

test('what is not JSON, or not JSON Python reads, is refused', () => {
  const bad = [
    '',
    ' ',
    '{',
    '{"a"}',
    '{"a":1,}',
    '[1,]',
    '01',
    '1.',
    '.5',
    '+1',
    '-',
    '1e',
    'NaN',
    'Infinity',
    'tru',
    '"\\x"',
    '"a\u0001"',
    '"\\ud800"',
    '"\\udc00"',
    '"\\ud800\\u0041"',
    '1 2',
    "'a'",
    '\ufeff{}',
    '1e400',
    `1${'0'.repeat(4300)}`,
    `${'['.repeat(200)}${']'.repeat(200)}`,
  ];
  for (const text of bad) assert.throws(() => parseJson(text), CanonicalError, JSON.stringify(text.slice(0, 20)));
  assert.equal(canonical(parseJson(`${'['.repeat(100)}${']'.repeat(100)}`)), `${'['.repeat(100)}${']'.repeat(100)}`);
  assert.equal(canonical(parseJson(`1${'0'.repeat(4299)}`)), `1${'0'.repeat(4299)}`);
});
