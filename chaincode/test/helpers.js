'use strict';
/* Shared by the tests: the Python vectors (made now by the project's own code) and a ledger to replay them. */

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { LedgerContract } = require('../lib/contract');
const { World } = require('./stub');

const PYTHON = process.env.VFED_PYTHON || '/work/main/.venv/bin/python';

let cached = null;

/** What Python says (test/make_vectors.py), made once per test process. */
function vectors() {
  if (cached === null) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfed-chaincode-'));
    try {
      const out = path.join(dir, 'vectors.json');
      execFileSync(PYTHON, [path.join(__dirname, 'make_vectors.py'), out], { stdio: ['ignore', 'ignore', 'inherit'] });
      cached = JSON.parse(fs.readFileSync(out, 'utf8'));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  return cached;
}

/** A fresh channel with the chaincode initialized for `sequence`'s collaboration and organizations; the
 * endorser's clock follows `clock.ms`. */
async function ledgerFor(sequence, { skewS } = {}) {
  const clock = { ms: sequence.now * 1000 };
  const contract = new LedgerContract({ clock: () => clock.ms });
  const world = new World();
  const args = [String(sequence.collab), JSON.stringify(sequence.orgs)];
  if (skewS !== undefined) args.push(String(skewS));
  await world.invoke(contract, 'InitLedger', args, { timestampS: sequence.now });
  const invoke = (fn, fnArgs, { msp = 'Org1MSP', timeS = clock.ms / 1000 } = {}) =>
    world.invoke(contract, fn, fnArgs, { msp, timestampS: timeS });
  return { clock, contract, world, invoke };
}

/** Append `step` as the vectors say (its MSP, at its time): {ok, result | error}. */
async function appendStep(ledger, step) {
  ledger.clock.ms = step.time * 1000;
  try {
    const result = JSON.parse(await ledger.invoke('Append', [step.entry], { msp: step.msp, timeS: step.time }));
    return { ok: true, result };
  } catch (error) {
    return { ok: false, error };
  }
}

/** The first `count` steps of the main sequence that Python accepted, appended. */
async function mainLedger(count = Infinity) {
  const main = vectors().sequences.find((s) => s.name === 'main');
  const ledger = await ledgerFor(main);
  const accepted = main.steps.filter((s) => s.python === 'accepted').slice(0, count);
  for (const step of accepted) {
    const done = await appendStep(ledger, step);
    if (!done.ok) throw done.error;
  }
  return { main, ledger, accepted };
}

module.exports = { appendStep, ledgerFor, mainLedger, vectors };
