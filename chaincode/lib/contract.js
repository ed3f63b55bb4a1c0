'use strict';
/*
 * vfed's ledger on Hyperledger Fabric: each organization's peer endorses an append only after applying the
 * checks every Python verifier applies (common/vfed/common/ledger/state.py `LedgerState`), so no single
 * party orders, forges or rewrites entries. Entries, digests and chain hashes are byte for byte those of the
 * embedded ledger (lib/canonical.js, lib/entry.js, `link` in lib/ledger.js).
 *
 * Anchoring organizations. Python verifiers anchor each organization at a pinned fingerprint of its first
 * key; the chaincode has no pins. `InitLedger(collaborationId, orgsJson[, skewS])`, called once with the
 * chaincode's init, records which Fabric MSP acts for which vfed organization (`{"Org1MSP": 1, ...}`, one
 * MSP per organization). A `key.genesis` or `key.rotation` of organization N is accepted only when the
 * transaction's client belongs to N's MSP (ctx.clientIdentity.getMSPID()), so no party can squat another
 * organization's id or slip a key into its chain. Every other entry is authorized by vfed signatures, as in
 * state.py: certificates and revocations by a key on the organization's chain, datasets, receipts and
 * checkpoints by the acting organization's key, lease entries by an org admin's certified key of the
 * dataset's owner (certificate valid at the entry's time with Python's 300 s allowance, not revoked).
 *
 * Time. Fabric's transaction timestamp is set by the submitting client, so the endorser refuses a
 * transaction whose timestamp is more than `skewS` (default 300 s) from its own clock, and then uses the
 * timestamp as "now": no entry's `at` (nor a receipt's start or finish) may lie after now + skew, a lease
 * entry's `at` may not lie before now - skew (its admin's certificate is judged at `at`), and a receipt's
 * run must have started while its lease was in force (`runRefusal` in lib/ledger.js).
 *
 * Where this differs from LedgerState, the chaincode is stricter, never laxer, so that a Python verifier
 * reading this ledger accepts everything on it: entries of an organization without key records here are
 * refused (Python, when not pinned, lists them as problems); JSON types Python would coerce are refused;
 * certificates are checked in full when taken in; the time rules above.
 */

const { Contract } = require('fabric-contract-api');
const { parseJson } = require('./canonical');
const { GENESIS_HASH, Ledger, Rejection } = require('./ledger');
const { BY_DATASET, BY_GRANTEE } = require('./ledger');

const META = 'meta';
const DEFAULT_SKEW_S = 300;
const MAX_SKEW_S = 86400;
const DECIMAL = /^(0|[1-9][0-9]{0,15})$/;

function decimal(text, what, min) {
  if (typeof text !== 'string' || !DECIMAL.test(text) || Number(text) > Number.MAX_SAFE_INTEGER || Number(text) < min) {
    throw new Rejection(
      `${what} must be a whole number of at least ${min}, got ${JSON.stringify(String(text)).slice(0, 40)}`,
    );
  }
  return Number(text);
}

function parseOrgs(orgsJson) {
  let orgs;
  try {
    orgs = parseJson(orgsJson);
  } catch (exc) {
    throw new Rejection(`orgsJson is not JSON: ${exc.message}`);
  }
  if (orgs === null || typeof orgs !== 'object' || Array.isArray(orgs) || Object.keys(orgs).length === 0) {
    throw new Rejection('orgsJson must be an object {"<MSP id>": <organization id>, ...} naming at least one MSP');
  }
  const out = {};
  const seen = new Set();
  for (const [msp, org] of Object.entries(orgs)) {
    if (msp.length === 0 || msp.length > 128)
      throw new Rejection(`MSP id ${JSON.stringify(msp)} must be 1 to 128 characters`);
    if (typeof org !== 'bigint' || org < 1n || org > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new Rejection(`MSP ${msp}: the organization id must be a positive integer`);
    }
    if (seen.has(org)) throw new Rejection(`organization ${org} is named for two MSPs (one MSP per organization)`);
    seen.add(org);
    out[msp] = Number(org);
  }
  return out;
}

class LedgerContract extends Contract {
  /** `options.clock` (milliseconds, like Date.now) stands in for the endorser's clock in tests. */
  constructor(options = {}) {
    super('LedgerContract');
    this._clock = options.clock || Date.now;
  }

  /** The transaction's time in seconds, refused when it is more than `skewS` from this endorser's clock. */
  _now(ctx, skewS) {
    const ts = ctx.stub.getTxTimestamp();
    const seconds = typeof ts.seconds === 'object' && ts.seconds !== null ? ts.seconds.toNumber() : Number(ts.seconds);
    const txS = seconds + (ts.nanos || 0) / 1e9;
    const ownS = this._clock() / 1000;
    if (!Number.isFinite(txS) || Math.abs(txS - ownS) > skewS) {
      throw new Rejection(
        `transaction ${ctx.stub.getTxID()}: its timestamp ${txS} is more than ${skewS} s from this endorser's clock (${ownS.toFixed(3)})`,
      );
    }
    return txS;
  }

  async _ledger(ctx) {
    const raw = await ctx.stub.getState(META);
    if (!raw || raw.length === 0) throw new Rejection('the ledger is not initialized (InitLedger has not run)');
    const meta = JSON.parse(Buffer.from(raw).toString('utf8'));
    return new Ledger(ctx.stub, meta, this._now(ctx, meta.skewS));
  }

  /** Once, with the chaincode's init: `collaborationId, orgsJson[, skewS]`, this channel's collaboration
   * and which MSP acts for which organization (see the top of this file). Arguments are taken as a rest
   * parameter because fabric-contract-api demands the declared count exactly, and `skewS` is optional. */
  async InitLedger(ctx, ...args) {
    if (args.length < 2 || args.length > 3) {
      throw new Rejection(
        `InitLedger takes collaborationId, orgsJson and optionally skewS (${args.length} arguments given)`,
      );
    }
    const [collaborationId, orgsJson, skewS] = args;
    const existing = await ctx.stub.getState(META);
    if (existing && existing.length) throw new Rejection('the ledger is initialized already (InitLedger runs once)');
    const meta = {
      collaborationId: decimal(collaborationId, 'collaborationId', 1),
      orgs: parseOrgs(orgsJson),
      skewS: skewS === undefined || skewS === '' ? DEFAULT_SKEW_S : decimal(skewS, 'skewS', 1),
    };
    if (meta.skewS > MAX_SKEW_S) throw new Rejection(`skewS must be at most ${MAX_SKEW_S}`);
    this._now(ctx, meta.skewS);
    await ctx.stub.putState(META, Buffer.from(JSON.stringify(meta)));
    return JSON.stringify(meta);
  }

  /** Check a signed entry (its JSON text) and chain it at the next place: `{"seq", "hash"}`. */
  async Append(ctx, entryJson) {
    const ledger = await this._ledger(ctx);
    return JSON.stringify(await ledger.append(entryJson, ctx.clientIdentity.getMSPID()));
  }

  /** `after[, limit]`: records after `after`, at most `limit` (default and cap 1000), as
   * `{"entries": [{"seq", "hash", "entry"}]}` (a rest parameter, as InitLedger's, for the optional limit). */
  async Read(ctx, ...args) {
    if (args.length < 1 || args.length > 2)
      throw new Rejection(`Read takes after and optionally limit (${args.length} arguments given)`);
    const [after, limit] = args;
    const ledger = await this._ledger(ctx);
    const count = limit === undefined || limit === '' ? 1000 : decimal(limit, 'limit', 1);
    return ledger.read(decimal(after, 'after', 0), count);
  }

  async Head(ctx) {
    const ledger = await this._ledger(ctx);
    return JSON.stringify(await ledger.head());
  }

  /** Leases on an organization's dataset (by label), oldest first, with their expiry, revocation, runs and
   * epsilon spent as the ledger says now. */
  async LeasesOnDataset(ctx, owner, label) {
    const ledger = await this._ledger(ctx);
    if (typeof label !== 'string' || label.length === 0 || label.includes('\0'))
      throw new Rejection('label must be a dataset label');
    return JSON.stringify(await ledger.leasesByPartialKey(BY_DATASET, [String(decimal(owner, 'owner', 0)), label]));
  }

  /** Leases granted to an organization, oldest first, as `LeasesOnDataset`. */
  async LeasesForGrantee(ctx, org) {
    const ledger = await this._ledger(ctx);
    return JSON.stringify(await ledger.leasesByPartialKey(BY_GRANTEE, [String(decimal(org, 'org', 0))]));
  }
}

module.exports = { DEFAULT_SKEW_S, GENESIS_HASH, LedgerContract };
