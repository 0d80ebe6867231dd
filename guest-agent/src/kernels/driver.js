// Kernel driver of sandbox-agent's javascript code contexts: a persistent
// node process that evaluates each cell in V8's REPL mode through the
// inspector protocol (as a debugger console does), so let and const may be
// declared again, top-level await works and the last expression is the
// cell's value. The agent starts it as
//   node -e <this file> EVENT_FD
// and speaks to it as to the Jupyter driver: requests on stdin
// ({"execute": {"code", "env", "timeout_ms"}} or {"interrupt": true}),
// events on EVENT_FD (ready, stdout, stderr, count, result, error, return,
// done, and timeout when it stopped a cell itself). A cell that keeps the thread busy past timeout_ms is terminated
// by V8; one that awaits past it is given up on when the agent interrupts.
// Everything of the driver's own lives in this function's scope, so cells
// see only what it puts on globalThis.
(() => {
'use strict';
const fs = require('fs');
const inspector = require('inspector');
const readline = require('readline');
const util = require('util');

const eventFd = Number(process.argv[process.argv.length - 1]);
const emit = (kind, value) => fs.writeSync(eventFd, JSON.stringify({ [kind]: value }) + '\n');

// What cells write to process.stdout and process.stderr (console.log too)
// becomes stream events.
for (const [name, stream] of [['stdout', process.stdout], ['stderr', process.stderr]]) {
  stream.write = (chunk, encoding, callback) => {
    emit(name, typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
    if (typeof encoding === 'function') encoding();
    else if (typeof callback === 'function') callback();
    return true;
  };
}

const session = new inspector.Session();
session.connect();
const post = (method, params) =>
  new Promise((resolve, reject) => session.post(method, params, (error, result) => (error ? reject(error) : resolve(result))));

// A MIME bundle of a value: text/plain always, application/json for plain
// data; an object with a `_repr_mimebundle_()` method gives its own.
function bundle(value) {
  if (value && typeof value._repr_mimebundle_ === 'function') {
    const own = value._repr_mimebundle_();
    return Object.fromEntries(Object.entries(own).map(([k, v]) => [k, typeof v === 'string' ? v : JSON.stringify(v)]));
  }
  const data = { 'text/plain': util.inspect(value, { colors: false, depth: 4 }) };
  if (value !== null && typeof value === 'object' && (Array.isArray(value) || Object.getPrototypeOf(value) === Object.prototype)) {
    try {
      data['application/json'] = JSON.stringify(value);
    } catch (_) {
      // Cycles or BigInts: text/plain alone.
    }
  }
  return data;
}

globalThis.require = require;
globalThis.module = module;
globalThis.__return__ = (value) => emit('return', JSON.stringify(value === undefined ? null : value));
globalThis.display = (value) => emit('result', { data: bundle(value), main: false });
// Called through the inspector on a cell's value and on what it threw.
globalThis.__sandbox_describe = bundle;
// A stack without the driver's own frames.
const cellFrames = (stack) => String(stack || '').split('\n')
  .filter((line) => !/\[eval\]|node:inspector|node:internal|at new Promise \(<anonymous>\)/.test(line)).join('\n');
globalThis.__sandbox_error = (error) => {
  if (error instanceof Error) return { name: error.name, value: error.message, traceback: cellFrames(error.stack) };
  return { name: 'Error', value: util.inspect(error), traceback: '' };
};

// Calls the global function `name` on a remote object, returning its value.
let globalId;
async function callOn(name, remote) {
  if (!globalId) globalId = (await post('Runtime.evaluate', { expression: 'globalThis' })).result.objectId;
  const argument = { objectId: remote.objectId, value: remote.value, unserializableValue: remote.unserializableValue };
  const reply = await post('Runtime.callFunctionOn', {
    objectId: globalId, functionDeclaration: `function (v) { return ${name}(v); }`, arguments: [argument], returnByValue: true,
  });
  return reply.result.value;
}

let count = 0;

async function execute({ code, env, timeout_ms: timeout }) {
  const saved = {};
  for (const [name, value] of Object.entries(env || {})) {
    saved[name] = process.env[name];
    process.env[name] = value;
  }
  count += 1;
  emit('count', count);
  try {
    const reply = await post('Runtime.evaluate', { expression: code, replMode: true, awaitPromise: true, timeout })
      .catch((error) => {
        if (/terminated/.test(error.message)) return { timedOut: true };
        throw error;
      });
    if (reply.timedOut) {
      emit('timeout', {});
      emit('error', { name: 'TimeoutError', value: `the cell ran past its ${timeout} ms deadline and was stopped`, traceback: '' });
      return;
    }
    if (reply.exceptionDetails) {
      const thrown = reply.exceptionDetails.exception;
      emit('error', thrown ? await callOn('__sandbox_error', thrown)
        : { name: 'Error', value: reply.exceptionDetails.text, traceback: '' });
    } else if (reply.result.type !== 'undefined') {
      emit('result', { data: await callOn('__sandbox_describe', reply.result), main: true });
    }
  } catch (error) {
    emit('error', { name: 'InternalError', value: String(error && error.message), traceback: '' });
  } finally {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  }
}

// Cells run one after another; an interrupt gives up on the running one
// (a cell that blocks the thread is the agent's to end: it restarts us).
const queue = [];
let running = null;
async function pump() {
  if (running) return;
  while (queue.length) {
    const request = queue.shift();
    let interrupted;
    running = new Promise((resolve) => (interrupted = resolve));
    running.interrupt = interrupted;
    const outcome = await Promise.race([execute(request).then(() => false), running.then(() => true)]);
    if (outcome) emit('error', { name: 'KeyboardInterrupt', value: 'the cell was interrupted', traceback: '' });
    running = null;
    emit('done', {});
  }
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const request = JSON.parse(line);
  if (request.interrupt) {
    if (running) running.interrupt();
    return;
  }
  queue.push(request.execute);
  pump();
}).on('close', () => process.exit(0));

emit('ready', { pid: process.pid });
})();
