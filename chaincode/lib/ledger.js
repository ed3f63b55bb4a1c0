'use strict';
/*
 * The ledger's rules at endorsement, as common/vfed/common/ledger/state.py `LedgerState.apply` checks them
 * (see contract.js for what differs and why). One `Ledger` serves one transaction: Fabric's getState does not
 * see the transaction's own writes, so what it writes is also kept in `cache` and read from there.
 */

const crypto = require('node:crypto');
const { KINDS, BodyError } = require('./bodies');
const { MalformedEntry, parseEntry, signedBy } = require('./entry');
const { ChainError, GENESIS, ROTATION, verifyChain } = require('./keychain');
const { KeyError, parsePublicKey } = require('./keys');

const GENESIS_HASH = '0'.repeat(64);
const LEDGER_DOMAIN = Buffer.from('vfed/ledger/v1\0', 'latin1');
const CERTIFICATE = 'user.certificate';
const REVOCATION = 'user.revocation';
const ADMIN_ROLE = 'org-admin';
const LEASE_KINDS = new Set(['lease.granted', 'lease.extended', 'lease.revoked']);
/** The skew Python's verifiers allow a certificate at an entry's time (LedgerState's default): fixed, so that
 * the chaincode never accepts a lease entry a Python verifier refuses. */
const CERTIFICATE_SKEW_S = 300;
const SEQ_DIGITS = 20;
const MAX_READ = 1000;

class Rejection extends Error {}

const KEYS = {
  head: 'head',
  record: (seq) => `rec~${String(seq).padStart(SEQ_DIGITS, '0')}`,
  digest: (digest) => `digest~${digest}`,
  chain: (org) => `org~${org}~chain`,
  certificates: (org) => `org~${org}~certificates`,
  revoked: (org) => `org~${org}~revoked`,
  dataset: (digest) => `dataset~${digest}`,
  lease: (digest) => `lease~${digest}`,
};
const BY_DATASET = 'lease~dataset';
const BY_GRANTEE = 'lease~grantee';

const parsedKeys = new Map();

/** A chain key from its text, parsed once per process (the text was verified when it was taken in). */
function chainKey(text) {
  let key = parsedKeys.get(text);
  if (key === undefined) {
    key = parsePublicKey(text);
    parsedKeys.set(text, key);
  }
  return key;
}

function link(collaborationId, seq, prevHash, entryJson) {
  const numbers = Buffer.alloc(16);
  numbers.writeBigUInt64BE(BigInt(collaborationId), 0);
  numbers.writeBigUInt64BE(BigInt(seq), 8);
  const entryHash = crypto.createHash('sha256').update(entryJson, 'utf8').digest();
  return crypto
    .createHash('sha256')
    .update(Buffer.concat([LEDGER_DOMAIN, numbers, Buffer.from(prevHash, 'hex'), entryHash]))
    .digest('hex');
}

function short(text) {
  return text.slice(0, 12);
}

function safeOrg(value) {
  if (typeof value !== 'bigint' || value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
    return null;
  }
  return Number(value);
}

class Ledger {
  /** `meta`: {collaborationId, skewS, orgs: {msp: org}}; `nowS`: the transaction's time (seconds). */
  constructor(stub, meta, nowS) {
    this.stub = stub;
    this.meta = meta;
    this.nowS = nowS;
    this.cache = new Map();
  }

  async text(key) {
    if (this.cache.has(key)) return this.cache.get(key);
    const raw = await this.stub.getState(key);
    return raw && raw.length ? Buffer.from(raw).toString('utf8') : null;
  }

  async json(key) {
    const text = await this.text(key);
    return text === null ? null : JSON.parse(text);
  }

  async put(key, value) {
    const text = typeof value === 'string' ? value : JSON.stringify(value);
    this.cache.set(key, text);
    await this.stub.putState(key, Buffer.from(text, 'utf8'));
  }

  async head() {
    return (await this.json(KEYS.head)) || { seq: 0, hash: GENESIS_HASH };
  }

  async hashAt(seq) {
    if (seq === 0) return GENESIS_HASH;
    const record = await this.text(KEYS.record(seq));
    const found = record === null ? null : /^\{"seq":\d+,"hash":"([0-9a-f]{64})"/.exec(record);
    return found === null ? null : found[1];
  }

  /** Check `text` at the next place and chain it: {seq, hash}; Rejection naming the entry and why. */
  async append(text, msp) {
    let entry;
    try {
      entry = parseEntry(text);
    } catch (exc) {
      if (exc instanceof MalformedEntry) throw new Rejection(`the entry is refused: ${exc.message}`);
      throw exc;
    }
    const head = await this.head();
    const seq = head.seq + 1;
    const where = `ledger entry ${seq} (${entry.kind} ${short(entry.digest)})`;
    const before = await this.text(KEYS.digest(entry.digest));
    if (before !== null) throw new Rejection(`${where} repeats entry ${before} (replayed)`);
    if (entry.kind === GENESIS || entry.kind === ROTATION) {
      await this.takeKeyRecord(entry, where, msp);
    } else if (entry.kind === CERTIFICATE || entry.kind === REVOCATION) {
      await this.takeCertificate(entry, where);
    } else if (Object.prototype.hasOwnProperty.call(KINDS, entry.kind)) {
      await this.takeBody(entry, seq, where);
    } else {
      throw new Rejection(`${where} is of unknown kind ${JSON.stringify(entry.kind)}`);
    }
    const hash = link(this.meta.collaborationId, seq, head.hash, entry.json);
    await this.put(KEYS.record(seq), `{"seq":${seq},"hash":"${hash}","entry":${entry.json}}`);
    await this.put(KEYS.digest(entry.digest), String(seq));
    await this.put(KEYS.head, { seq, hash });
    return { seq, hash };
  }

  orgOf(entry, where) {
    const org = safeOrg(entry.body.org);
    if (org === null) throw new Rejection(`${where} names no organization`);
    return org;
  }

  async takeKeyRecord(entry, where, msp) {
    const org = this.orgOf(entry, where);
    const owner = Object.keys(this.meta.orgs).find((m) => this.meta.orgs[m] === org);
    if (owner === undefined) {
      throw new Rejection(
        `${where}: organization ${org} is not a member of this ledger (InitLedger names no MSP for it)`,
      );
    }
    if (owner !== msp) {
      throw new Rejection(
        `${where}: key records of organization ${org} are submitted by a client of MSP ${owner}, not ${msp}`,
      );
    }
    const stored = (await this.json(KEYS.chain(org))) || { records: [], keys: [] };
    const records = [...stored.records.map(parseEntry), entry];
    let keys;
    try {
      keys = verifyChain(entry.body.org, records);
    } catch (exc) {
      if (exc instanceof ChainError) throw new Rejection(`${where}: ${exc.message}`);
      throw exc;
    }
    await this.put(KEYS.chain(org), { records: [...stored.records, entry.json], keys });
  }

  async chainKeys(org) {
    const stored = await this.json(KEYS.chain(org));
    return stored === null ? null : new Map(stored.keys.map((k) => [k.keyId, k.text]));
  }

  async signedByOrg(entry, org, where) {
    const keys = await this.chainKeys(org);
    if (keys === null) {
      throw new Rejection(`${where}: organization ${org} has no key records on this ledger`);
    }
    for (const sig of entry.sigs) {
      const text = keys.get(sig.key_id);
      if (text !== undefined && signedBy(entry, chainKey(text))) return;
    }
    throw new Rejection(`${where} is not signed by a key of organization ${org} (forged?)`);
  }

  async takeCertificate(entry, where) {
    const org = this.orgOf(entry, where);
    await this.signedByOrg(entry, org, where);
    if (entry.kind === REVOCATION) {
      if (typeof entry.body.certificate !== 'string') throw new Rejection(`${where} names no certificate`);
      const revoked = (await this.json(KEYS.revoked(org))) || [];
      if (!revoked.includes(entry.body.certificate)) revoked.push(entry.body.certificate);
      await this.put(KEYS.revoked(org), revoked);
      return;
    }
    const certificates = (await this.json(KEYS.certificates(org))) || [];
    certificates.push(certificateTerms(entry, where));
    await this.put(KEYS.certificates(org), certificates);
  }

  async takeBody(entry, seq, where) {
    let body;
    try {
      body = KINDS[entry.kind](entry.body);
    } catch (exc) {
      if (exc instanceof BodyError) throw new Rejection(`${where} (${entry.kind}) is malformed (${exc.message})`);
      throw exc;
    }
    if (body.collab !== this.meta.collaborationId) {
      throw new Rejection(
        `${where} belongs to collaboration ${body.collab}, not ${this.meta.collaborationId} (replayed?)`,
      );
    }
    if (body.seen.seq >= seq) {
      throw new Rejection(`${where} claims to have seen entry ${body.seen.seq}, which comes after it`);
    }
    this.checkTime(body, entry.kind, where);
    const leases = new Map();
    await this.authorize(entry, body, where, leases);
    const ours = await this.hashAt(body.seen.seq);
    if (ours !== body.seen.hash) {
      throw new Rejection(
        `${where} was signed after its signer verified head ${body.seen.seq}:${short(body.seen.hash)}, but entry ` +
          `${body.seen.seq} here hashes to ${short(ours || '')}: its signer was shown another history (a fork)`,
      );
    }
    await this.record(entry, body, seq, leases);
  }

  /** No entry comes from the future; an entry whose authority is judged at its own time (a lease entry:
   * the admin's certificate at `at`) must also be fresh, so an expired certificate cannot sign back-dated. */
  checkTime(body, kind, where) {
    const skew = this.meta.skewS;
    const times = [['at', body.at]];
    if (kind === 'run.receipt') times.push(['started_at', body.started_at], ['finished_at', body.finished_at]);
    for (const [name, value] of times) {
      if (value !== null && value > this.nowS + skew) {
        throw new Rejection(`${where}: its ${name} ${value} lies more than ${skew} s after the transaction's time`);
      }
    }
    if (LEASE_KINDS.has(kind) && body.at < this.nowS - skew) {
      throw new Rejection(`${where} was signed at ${body.at}, more than ${skew} s before the transaction's time`);
    }
  }

  async lease(id, leases) {
    if (!leases.has(id)) leases.set(id, await this.json(KEYS.lease(id)));
    return leases.get(id);
  }

  async authorize(entry, body, where, leases) {
    if (entry.kind === 'run.receipt') {
      const start = body.started_at !== null ? body.started_at : body.finished_at;
      for (const use of body.datasets) {
        if (use.lease === null) continue;
        const lease = await this.lease(use.lease, leases);
        if (lease === null) throw new Rejection(`${where} names lease ${short(use.lease)}, not granted before it`);
        if (lease.owner !== body.org) {
          throw new Rejection(
            `${where}: organization ${body.org} reports a run on organization ${lease.owner}'s lease`,
          );
        }
        const why = runRefusal(lease, start, this.meta.skewS);
        if (why !== null) throw new Rejection(`${where}: ${why}`);
      }
    } else if (LEASE_KINDS.has(entry.kind)) {
      await this.authorizeLease(entry, body, where, leases);
      return;
    }
    await this.signedByOrg(entry, body.org, where);
  }

  async authorizeLease(entry, body, where, leases) {
    let owner;
    if (entry.kind === 'lease.granted') {
      const dataset = await this.json(KEYS.dataset(body.dataset));
      if (dataset === null)
        throw new Rejection(`${where} names dataset ${short(body.dataset)}, not registered before it`);
      if (dataset.org !== body.owner) {
        throw new Rejection(
          `${where}: dataset ${JSON.stringify(dataset.label)} belongs to organization ${dataset.org}, not ${body.owner}`,
        );
      }
      if (body.expires_at <= body.not_before) throw new Rejection(`${where} expires before it begins`);
      owner = body.owner;
    } else {
      const lease = await this.lease(body.lease, leases);
      if (lease === null) throw new Rejection(`${where} names lease ${short(body.lease)}, not granted before it`);
      if (entry.kind === 'lease.extended' && lease.revoked !== null) {
        throw new Rejection(`${where} extends lease ${short(lease.id)}, which was revoked`);
      }
      owner = lease.owner;
    }
    await this.admin(entry, owner, body.by, body.at, where);
  }

  /** The entry is signed by a certified, unrevoked org admin of `org` as of `at` (state.py `_admin`). */
  async admin(entry, org, by, at, where) {
    const keys = await this.chainKeys(org);
    if (keys === null) throw new Rejection(`${where}: organization ${org} has no verified keys on this ledger`);
    const signers = new Set(entry.sigs.map((s) => s.key_id));
    const revoked = new Set((await this.json(KEYS.revoked(org))) || []);
    for (const cert of (await this.json(KEYS.certificates(org))) || []) {
      if (!signers.has(cert.keyId)) continue;
      const why = certificateRefusal(cert, revoked, at);
      if (why !== null) throw new Rejection(`${where}: the signer's certificate does not hold: ${why}`);
      if (!cert.roles.includes(ADMIN_ROLE)) {
        throw new Rejection(
          `${where} is signed by user ${cert.user} of organization ${org}, whose certificate has roles ` +
            `${cert.roles.join(', ') || 'none'}: only an org admin (${ADMIN_ROLE}) may sign it`,
        );
      }
      if (cert.user !== by.user || cert.digest !== by.certificate) {
        throw new Rejection(`${where} names another admin or certificate than the one who signed it`);
      }
      if (!signedBy(entry, chainKey(cert.key)))
        throw new Rejection(`${where}: the admin's signature does not verify (forged?)`);
      return;
    }
    if ([...signers].some((k) => keys.has(k))) {
      throw new Rejection(
        `${where} is signed with organization ${org}'s own key; lease entries are signed by a certified org admin (${ADMIN_ROLE})`,
      );
    }
    throw new Rejection(`${where} is not signed by a certified org admin of organization ${org} (forged?)`);
  }

  async record(entry, body, seq, leases) {
    const now = this.nowS;
    if (entry.kind === 'dataset.registered') {
      const { org, label, description, content_hash: contentHash, at } = body;
      await this.put(KEYS.dataset(entry.digest), {
        digest: entry.digest,
        seq,
        org,
        label,
        description,
        content_hash: contentHash,
        at,
      });
    } else if (entry.kind === 'lease.granted') {
      const dataset = await this.json(KEYS.dataset(body.dataset));
      const lease = {
        id: entry.digest,
        seq,
        dataset: body.dataset,
        label: dataset.label,
        owner: body.owner,
        grantee: body.grantee,
        users: body.users,
        images: body.images,
        purpose: body.purpose,
        not_before: body.not_before,
        expires_at: body.expires_at,
        granted_expires_at: body.expires_at,
        epsilon: body.epsilon,
        max_runs: body.max_runs,
        by: body.by,
        extensions: [],
        revoked: null,
        runs: 0,
        epsilon_spent: 0,
      };
      await this.put(KEYS.lease(entry.digest), lease);
      const mark = Buffer.from(String(seq));
      await this.stub.putState(
        this.stub.createCompositeKey(BY_DATASET, [String(body.owner), dataset.label, entry.digest]),
        mark,
      );
      await this.stub.putState(this.stub.createCompositeKey(BY_GRANTEE, [String(body.grantee), entry.digest]), mark);
    } else if (entry.kind === 'lease.extended') {
      const lease = await this.lease(body.lease, leases);
      lease.expires_at = body.expires_at;
      lease.extensions.push({ seq, expires_at: body.expires_at, recorded_at: now });
      await this.put(KEYS.lease(lease.id), lease);
    } else if (entry.kind === 'lease.revoked') {
      const lease = await this.lease(body.lease, leases);
      if (lease.revoked === null) {
        lease.revoked = { seq, reason: body.reason, at: body.at, recorded_at: now };
        await this.put(KEYS.lease(lease.id), lease);
      }
    } else if (entry.kind === 'run.receipt') {
      for (const use of body.datasets) {
        if (use.lease === null) continue;
        const lease = leases.get(use.lease);
        lease.runs += 1;
        lease.epsilon_spent += use.epsilon || 0;
      }
      for (const lease of leases.values()) await this.put(KEYS.lease(lease.id), lease);
    }
  }

  /** Records `after+1 ...`, at most `limit` (capped at 1000), as the JSON text of `{"entries": [...]}`. */
  async read(after, limit) {
    const count = Math.min(limit, MAX_READ);
    const parts = [];
    if (count > 0) {
      for await (const item of this.stub.getStateByRange(KEYS.record(after + 1), KEYS.record(after + count + 1))) {
        parts.push(Buffer.from(item.value).toString('utf8'));
      }
    }
    return `{"entries":[${parts.join(',')}]}`;
  }

  async leasesByPartialKey(type, attributes) {
    const found = [];
    for await (const item of this.stub.getStateByPartialCompositeKey(type, attributes)) {
      const { attributes: parts } = this.stub.splitCompositeKey(item.key);
      found.push(await this.json(KEYS.lease(parts[parts.length - 1])));
    }
    found.sort((a, b) => a.seq - b.seq);
    return { leases: found.map((lease) => ({ ...lease, status: leaseStatus(lease, this.nowS) })) };
  }
}

/** What a certificate says, checked in full when it is taken in (Python checks its form only at use; a
 * certificate that could never hold is refused here at once). */
function certificateTerms(entry, where) {
  const b = entry.body;
  const fail = (what) => {
    throw new Rejection(`${where}: the certificate is malformed (${what})`);
  };
  const ints = {};
  for (const name of ['user', 'not_before', 'expires_at']) {
    ints[name] = safeOrg(b[name]);
    if (ints[name] === null) fail(`${name} is not an integer`);
  }
  let key;
  try {
    key = parsePublicKey(b.key);
  } catch (exc) {
    if (exc instanceof KeyError) fail(`its key: ${exc.message}`);
    throw exc;
  }
  if (!Array.isArray(b.roles) || !b.roles.every((r) => typeof r === 'string')) fail('roles must be a list of names');
  if ('seal_to_organization' in b && typeof b.seal_to_organization !== 'boolean')
    fail('seal_to_organization is not a boolean');
  return {
    digest: entry.digest,
    user: ints.user,
    roles: b.roles,
    not_before: ints.not_before,
    expires_at: ints.expires_at,
    key: key.text,
    keyId: key.keyId,
  };
}

function certificateRefusal(cert, revoked, at) {
  if (revoked.has(cert.digest)) return `the certificate of user ${cert.user} was revoked`;
  if (at + CERTIFICATE_SKEW_S < cert.not_before) return 'the certificate is not valid yet';
  if (at - CERTIFICATE_SKEW_S > cert.expires_at) return `the certificate of user ${cert.user} expired`;
  return null;
}

/** Why a run that started at `start` was not covered by the lease's time terms (None: it was). Only time
 * is judged: a receipt names neither the grantee nor the user, and its image is the node's local digest,
 * which may differ from the repository digest a lease names. Any expiry the lease ever had counts, and a
 * revocation only from when it was recorded, so a receipt of a run that was allowed when it started is
 * never refused (the node retries a refused receipt forever). */
function runRefusal(lease, start, skew) {
  const id = short(lease.id);
  if (lease.revoked !== null && start > lease.revoked.recorded_at + skew) {
    return `the run started at ${start}, after lease ${id} was revoked (recorded at ${lease.revoked.recorded_at})`;
  }
  if (start + skew < lease.not_before)
    return `the run started at ${start}, before lease ${id} is valid (${lease.not_before})`;
  const latest = Math.max(lease.granted_expires_at, ...lease.extensions.map((e) => e.expires_at));
  if (start - skew >= latest) return `the run started at ${start}, after lease ${id} expired (${latest})`;
  return null;
}

function leaseStatus(lease, now) {
  if (lease.revoked !== null) return 'revoked';
  if (now < lease.not_before) return 'not-yet-valid';
  if (now >= lease.expires_at) return 'expired';
  if (lease.max_runs !== null && lease.runs >= lease.max_runs) return 'exhausted';
  return 'active';
}

module.exports = { BY_DATASET, BY_GRANTEE, GENESIS_HASH, KEYS, Ledger, Rejection, link };
