'use strict';
/*
 * The canonical JSON of vfed's signed entries, byte for byte as Python's
 * `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)` encoded
 * in UTF-8 (common/vfed/common/trust/entries.py).
 *
 * JSON.parse cannot be used: it loses the difference between Python's int and float (`1` and `1.0` sign
 * differently) and rounds big integers. `parseJson` keeps it: a JSON integer becomes a BigInt (Python int),
 * any other number a JS number (Python float). Objects are null-prototype objects (a key named `__proto__`
 * is data). What Python's parser refuses (raw control characters in strings, lone surrogates, NaN,
 * leading zeros, trailing text) is refused here too.
 */

const MAX_DEPTH = 128;
/** Python refuses to write an int of more than 4300 digits (and its JSON parser to read one). */
const MAX_INT_DIGITS = 4300;

class CanonicalError extends Error {}

/** A lone surrogate (String.prototype.isWellFormed is Node 20+; Fabric's Node image may be older). */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function wellFormed(s) {
  return !LONE_SURROGATE.test(s);
}

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const ESCAPES = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

/** Parse JSON text into values that keep Python's types (see the top of this file). */
function parseJson(text) {
  if (typeof text !== 'string') {
    throw new CanonicalError('JSON text must be a string');
  }
  const parser = new Parser(text);
  parser.space();
  const value = parser.value(0);
  parser.space();
  if (parser.pos !== text.length) {
    parser.fail('unexpected text after the JSON value');
  }
  return value;
}

class Parser {
  constructor(text) {
    this.text = text;
    this.pos = 0;
  }

  fail(what) {
    throw new CanonicalError(`invalid JSON at character ${this.pos}: ${what}`);
  }

  space() {
    while (this.pos < this.text.length && WS.has(this.text.charCodeAt(this.pos))) {
      this.pos += 1;
    }
  }

  value(depth) {
    if (depth > MAX_DEPTH) {
      this.fail(`nested deeper than ${MAX_DEPTH}`);
    }
    const c = this.text[this.pos];
    if (c === '{') return this.object(depth);
    if (c === '[') return this.array(depth);
    if (c === '"') return this.string();
    if (c === '-' || (c >= '0' && c <= '9')) return this.number();
    for (const [word, val] of [
      ['true', true],
      ['false', false],
      ['null', null],
    ]) {
      if (this.text.startsWith(word, this.pos)) {
        this.pos += word.length;
        return val;
      }
    }
    return this.fail('expected a value');
  }

  object(depth) {
    const out = Object.create(null);
    this.pos += 1;
    this.space();
    if (this.text[this.pos] === '}') {
      this.pos += 1;
      return out;
    }
    for (;;) {
      if (this.text[this.pos] !== '"') this.fail('expected a key');
      const key = this.string();
      this.space();
      if (this.text[this.pos] !== ':') this.fail("expected ':'");
      this.pos += 1;
      this.space();
      out[key] = this.value(depth + 1); // a repeated key: the last one counts, as in Python
      this.space();
      const c = this.text[this.pos];
      this.pos += 1;
      if (c === '}') return out;
      if (c !== ',') this.fail("expected ',' or '}'");
      this.space();
    }
  }

  array(depth) {
    const out = [];
    this.pos += 1;
    this.space();
    if (this.text[this.pos] === ']') {
      this.pos += 1;
      return out;
    }
    for (;;) {
      out.push(this.value(depth + 1));
      this.space();
      const c = this.text[this.pos];
      this.pos += 1;
      if (c === ']') return out;
      if (c !== ',') this.fail("expected ',' or ']'");
      this.space();
    }
  }

  string() {
    const text = this.text;
    let pos = this.pos + 1;
    let out = '';
    let start = pos;
    for (;;) {
      if (pos >= text.length) {
        this.pos = pos;
        this.fail('unterminated string');
      }
      const code = text.charCodeAt(pos);
      if (code === 0x22) break;
      if (code < 0x20) {
        this.pos = pos;
        this.fail('control character in a string');
      }
      if (code !== 0x5c) {
        pos += 1;
        continue;
      }
      out += text.slice(start, pos);
      const e = text[pos + 1];
      if (e === 'u') {
        const unit = this.hex4(pos + 2);
        pos += 6;
        if (unit >= 0xd800 && unit <= 0xdbff && text.startsWith('\\u', pos)) {
          const low = this.hex4(pos + 2);
          if (low < 0xdc00 || low > 0xdfff) {
            this.pos = pos;
            this.fail('lone surrogate escape');
          }
          out += String.fromCharCode(unit, low);
          pos += 6;
        } else if (unit >= 0xd800 && unit <= 0xdfff) {
          this.pos = pos;
          this.fail('lone surrogate escape');
        } else {
          out += String.fromCharCode(unit);
        }
      } else if (e !== undefined && Object.prototype.hasOwnProperty.call(ESCAPES, e)) {
        out += ESCAPES[e];
        pos += 2;
      } else {
        this.pos = pos;
        this.fail('invalid escape');
      }
      start = pos;
    }
    out += text.slice(start, pos);
    this.pos = pos + 1;
    if (!wellFormed(out)) {
      this.fail('lone surrogate in a string');
    }
    return out;
  }

  hex4(at) {
    const digits = this.text.slice(at, at + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(digits)) {
      this.pos = at;
      this.fail('invalid \\u escape');
    }
    return parseInt(digits, 16);
  }

  number() {
    NUMBER.lastIndex = this.pos;
    const m = NUMBER.exec(this.text);
    if (m === null) this.fail('invalid number');
    const lexeme = m[0];
    this.pos += lexeme.length;
    const next = this.text[this.pos];
    if (next !== undefined && /[0-9.eE+-]/.test(next)) this.fail('invalid number');
    if (m[1] === undefined && m[2] === undefined) {
      if (lexeme.replace('-', '').length > MAX_INT_DIGITS) this.fail('integer out of range');
      return BigInt(lexeme);
    }
    const value = Number(lexeme);
    if (!Number.isFinite(value)) this.fail('number out of range');
    return value;
  }
}

function escapeString(s) {
  if (!wellFormed(s)) {
    throw new CanonicalError('text holds a lone surrogate (no UTF-8 form)');
  }
  let out = '"';
  let start = 0;
  for (let i = 0; i < s.length; i += 1) {
    const code = s.charCodeAt(i);
    let rep = null;
    if (code === 0x22) rep = '\\"';
    else if (code === 0x5c) rep = '\\\\';
    else if (code < 0x20) {
      rep = { 8: '\\b', 9: '\\t', 10: '\\n', 12: '\\f', 13: '\\r' }[code] || `\\u${code.toString(16).padStart(4, '0')}`;
    }
    if (rep !== null) {
      out += s.slice(start, i) + rep;
      start = i + 1;
    }
  }
  return `${out}${s.slice(start)}"`;
}

/** Python's `repr(float)`: the shortest digits that read back, fixed notation for 1e-4 <= |x| < 1e16. */
function floatRepr(x) {
  if (!Number.isFinite(x)) {
    throw new CanonicalError(`${x} has no JSON form`);
  }
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  // String(x) gives the same shortest round-trip digits; take them and the decimal exponent from it.
  const m = /^(\d+)(?:\.(\d+))?(?:e([+-]\d+))?$/.exec(String(Math.abs(x)));
  let digits = m[1] + (m[2] || '');
  let point = m[1].length + Number(m[3] || 0); // value = 0.<digits> * 10^point
  const lead = digits.length - digits.replace(/^0+/, '').length;
  digits = digits.slice(lead).replace(/0+$/, '');
  point -= lead;
  const exp = point - 1;
  if (exp < -4 || exp >= 16) {
    const mantissa = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const e = Math.abs(exp).toString().padStart(2, '0');
    return `${sign}${mantissa}e${exp < 0 ? '-' : '+'}${e}`;
  }
  if (point <= 0) return `${sign}0.${'0'.repeat(-point)}${digits}`;
  if (digits.length <= point) return `${sign}${digits}${'0'.repeat(point - digits.length)}.0`;
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}

/** Python sorts keys by code point; for well-formed text that is the order of their UTF-8 bytes. */
function compareKeys(a, b) {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/** Canonical JSON text of a value made by `parseJson` (or built of the same types). */
function canonical(value) {
  if (value === null) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number') return floatRepr(value);
  if (typeof value === 'string') return escapeString(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (typeof value === 'object') {
    const keys = Object.keys(value);
    for (const key of keys) {
      if (!wellFormed(key)) throw new CanonicalError('a key holds a lone surrogate (no UTF-8 form)');
    }
    keys.sort(compareKeys);
    return `{${keys.map((k) => `${escapeString(k)}:${canonical(value[k])}`).join(',')}}`;
  }
  throw new CanonicalError(`a ${typeof value} has no canonical JSON form`);
}

module.exports = { CanonicalError, canonical, floatRepr, parseJson, MAX_INT_DIGITS };
