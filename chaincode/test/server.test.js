'use strict';
/* `fabric-chaincode-node server` (chaincode as a service, as the Fabric network tests run it) loads this
 * package and listens. */

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const { test } = require('node:test');

const ROOT = path.join(__dirname, '..');

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

function connects(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.on('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}

test('the package starts in server mode and listens on the chaincode address', { timeout: 90000 }, async () => {
  const port = await freePort();
  const bin = path.join(ROOT, 'node_modules', '.bin', 'fabric-chaincode-node');
  const child = spawn(
    bin,
    ['server', '--chaincode-address', `127.0.0.1:${port}`, '--chaincode-id', 'vfed-ledger:0123'],
    {
      cwd: ROOT,
      detached: true,
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  try {
    // generous: the machine is shared, and loading grpc under load has taken seconds
    const deadline = Date.now() + 45000;
    let up = false;
    while (!up && child.exitCode === null && Date.now() < deadline) {
      up = await connects(port);
      if (!up) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(up, `the chaincode server did not listen on ${port} (exit code ${child.exitCode}): ${stderr}`);
  } finally {
    if (child.exitCode === null) process.kill(-child.pid, 'SIGTERM');
    const { signal, code } = await exited;
    assert.ok(signal === 'SIGTERM' || code !== null);
  }
});
