'use strict';
/*
 * The bodies of the ledger's own kinds (common/vfed/common/ledger/kinds.py): the same fields, limits and
 * patterns. JSON types must be the ones Python's writers produce (an integer field holds a JSON integer, not
 * "3", 3.0 or true, which pydantic would coerce), and integers must be exact in a JS number (|n| < 2^53):
 * stricter than Python, never laxer. Returns plain objects with JS numbers.
 */

const { codePoints, isObject } = require('./entry');

const SHA256 = /^[0-9a-f]{64}$/;
const LABEL = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

class BodyError extends Error {
  constructor(field, what) {
    super(`${field}: ${what}`);
  }
}

function int(value, field, min = -Infinity) {
  if (typeof value !== 'bigint') throw new BodyError(field, 'must be an integer');
  if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new BodyError(field, 'integer out of the range this ledger keeps (|n| < 2^53)');
  }
  const n = Number(value);
  if (n < min) throw new BodyError(field, `must be at least ${min}`);
  return n;
}

function float(value, field) {
  if (typeof value === 'bigint') return int(value, field);
  if (typeof value !== 'number') throw new BodyError(field, 'must be a number');
  return value;
}

function str(value, field, { max = Infinity, pattern = null } = {}) {
  if (typeof value !== 'string') throw new BodyError(field, 'must be a string');
  if (codePoints(value) > max) throw new BodyError(field, `at most ${max} characters`);
  if (pattern !== null && !pattern.test(value)) throw new BodyError(field, `must match ${pattern.source}`);
  return value;
}

function optional(value, parse) {
  return value === undefined || value === null ? null : parse(value);
}

function list(value, field, max, parse) {
  if (!Array.isArray(value)) throw new BodyError(field, 'must be a list');
  if (value.length > max) throw new BodyError(field, `at most ${max} items`);
  return value.map((item, i) => parse(item, `${field}.${i}`));
}

/** The object's fields, refusing any other (pydantic's extra="forbid"); `required` must be present. */
function fields(value, field, allowed, required) {
  if (!isObject(value)) throw new BodyError(field, 'must be an object');
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) throw new BodyError(field ? `${field}.${key}` : key, 'extra field not permitted');
  }
  for (const key of required) {
    if (!(key in value)) throw new BodyError(field ? `${field}.${key}` : key, 'field required');
  }
  return value;
}

function head(value, field) {
  const v = fields(value, field, ['seq', 'hash'], ['seq', 'hash']);
  return { seq: int(v.seq, `${field}.seq`, 0), hash: str(v.hash, `${field}.hash`, { pattern: SHA256 }) };
}

function actor(value, field) {
  const v = fields(value, field, ['user', 'certificate'], ['user', 'certificate']);
  return {
    user: int(v.user, `${field}.user`),
    certificate: str(v.certificate, `${field}.certificate`, { pattern: SHA256 }),
  };
}

const COMMON = ['collab', 'at', 'seen'];

function common(b) {
  return { collab: int(b.collab, 'collab', 1), at: int(b.at, 'at', 0), seen: head(b.seen, 'seen') };
}

function dataset(body) {
  const b = fields(body, '', [...COMMON, 'org', 'label', 'description', 'content_hash'], [...COMMON, 'org', 'label']);
  return {
    ...common(b),
    org: int(b.org, 'org'),
    label: str(b.label, 'label', { pattern: LABEL }),
    description: b.description === undefined ? '' : str(b.description, 'description', { max: 2000 }),
    content_hash: optional(b.content_hash, (v) => str(v, 'content_hash', { pattern: SHA256 })),
  };
}

function image(value, field) {
  const text = str(value, field);
  if (!text.startsWith('sha256:') || codePoints(text) !== 71)
    throw new BodyError(field, 'not an image digest (sha256:<64 hex>)');
  return text;
}

function metadata(value) {
  if (!isObject(value)) throw new BodyError('metadata', 'must be an object');
  const out = {};
  for (const key of Object.keys(value)) out[key] = str(value[key], `metadata.${key}`);
  return out;
}

function lease(body) {
  const names = [
    'dataset',
    'owner',
    'grantee',
    'users',
    'purpose',
    'images',
    'not_before',
    'expires_at',
    'epsilon',
    'max_runs',
    'metadata',
    'by',
  ];
  const b = fields(
    body,
    '',
    [...COMMON, ...names],
    [...COMMON, 'dataset', 'owner', 'grantee', 'not_before', 'expires_at', 'by'],
  );
  const epsilon = optional(b.epsilon, (v) => float(v, 'epsilon'));
  if (epsilon !== null && !(epsilon > 0)) throw new BodyError('epsilon', 'must be greater than 0');
  return {
    ...common(b),
    dataset: str(b.dataset, 'dataset', { pattern: SHA256 }),
    owner: int(b.owner, 'owner'),
    grantee: int(b.grantee, 'grantee'),
    users: optional(b.users, (v) => list(v, 'users', 1000, int)),
    purpose: b.purpose === undefined ? '' : str(b.purpose, 'purpose', { max: 2000 }),
    images: optional(b.images, (v) => list(v, 'images', 100, image)),
    not_before: int(b.not_before, 'not_before'),
    expires_at: int(b.expires_at, 'expires_at'),
    epsilon,
    max_runs: optional(b.max_runs, (v) => int(v, 'max_runs', 1)),
    metadata: optional(b.metadata, metadata),
    by: actor(b.by, 'by'),
  };
}

function extend(body) {
  const b = fields(body, '', [...COMMON, 'lease', 'expires_at', 'by'], [...COMMON, 'lease', 'expires_at', 'by']);
  return {
    ...common(b),
    lease: str(b.lease, 'lease', { pattern: SHA256 }),
    expires_at: int(b.expires_at, 'expires_at'),
    by: actor(b.by, 'by'),
  };
}

function revoke(body) {
  const b = fields(body, '', [...COMMON, 'lease', 'reason', 'by'], [...COMMON, 'lease', 'by']);
  return {
    ...common(b),
    lease: str(b.lease, 'lease', { pattern: SHA256 }),
    reason: b.reason === undefined ? '' : str(b.reason, 'reason', { max: 500 }),
    by: actor(b.by, 'by'),
  };
}

function use(value, field) {
  const v = fields(value, field, ['label', 'dataset', 'lease', 'epsilon'], ['label']);
  const epsilon = optional(v.epsilon, (x) => float(x, `${field}.epsilon`));
  if (epsilon !== null && !(epsilon >= 0)) throw new BodyError(`${field}.epsilon`, 'must be at least 0');
  return {
    label: str(v.label, `${field}.label`, { pattern: LABEL }),
    dataset: optional(v.dataset, (x) => str(x, `${field}.dataset`, { pattern: SHA256 })),
    lease: optional(v.lease, (x) => str(x, `${field}.lease`, { pattern: SHA256 })),
    epsilon,
  };
}

function receipt(body) {
  const names = [
    'org',
    'task',
    'run',
    'descriptor',
    'datasets',
    'image',
    'input',
    'result',
    'started_at',
    'finished_at',
    'status',
  ];
  const b = fields(
    body,
    '',
    [...COMMON, ...names],
    [...COMMON, 'org', 'task', 'run', 'image', 'finished_at', 'status'],
  );
  const sha = (name) => optional(b[name], (v) => str(v, name, { pattern: SHA256 }));
  return {
    ...common(b),
    org: int(b.org, 'org'),
    task: int(b.task, 'task'),
    run: int(b.run, 'run'),
    descriptor: sha('descriptor'),
    datasets: b.datasets === undefined ? [] : list(b.datasets, 'datasets', 100, use),
    image: str(b.image, 'image', { max: 200 }),
    input: sha('input'),
    result: sha('result'),
    started_at: optional(b.started_at, (v) => int(v, 'started_at')),
    finished_at: int(b.finished_at, 'finished_at'),
    status: str(b.status, 'status', { max: 40 }),
  };
}

function checkpoint(body) {
  const b = fields(body, '', [...COMMON, 'org'], [...COMMON, 'org']);
  return { ...common(b), org: int(b.org, 'org') };
}

const KINDS = {
  'dataset.registered': dataset,
  'lease.granted': lease,
  'lease.extended': extend,
  'lease.revoked': revoke,
  'run.receipt': receipt,
  'ledger.checkpoint': checkpoint,
};

module.exports = { BodyError, KINDS, SHA256, int, str };
