// The official `e2b` npm SDK, unmodified, against sandboxd's E2B front door.
// Run by scripts/test.sh with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set
// (and E2B_OTHER_KEY, a second key of the same daemon) and NODE_PATH naming the
// installed SDK.
import { test, after, before } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'

const require = createRequire(process.env.NODE_PATH + '/')
const { Sandbox, CommandExitError } = require('e2b')

let sbx
before(async () => {
  sbx = await Sandbox.create({ envs: { GREETING: 'hi from js' }, metadata: { suite: 'e2b-js' } })
})
after(async () => {
  await sbx?.kill()
})

test('create applies env vars and metadata', async () => {
  assert.equal((await sbx.commands.run('echo $GREETING')).stdout, 'hi from js\n')
  assert.deepEqual((await sbx.getInfo()).metadata, { suite: 'e2b-js' })
})

test('commands.run gives stdout, stderr and the exit code', async () => {
  const result = await sbx.commands.run('echo out; echo err >&2')
  assert.equal(result.stdout, 'out\n')
  assert.equal(result.stderr, 'err\n')
  assert.equal(result.exitCode, 0)
  await assert.rejects(sbx.commands.run('exit 7'), (error) => error instanceof CommandExitError && error.exitCode === 7)
})

test('a background command streams onStdout as it runs', async () => {
  const seen = []
  const handle = await sbx.commands.run('for i in 1 2 3; do echo n$i; sleep 0.2; done', {
    background: true,
    onStdout: (data) => seen.push(data),
  })
  const result = await handle.wait()
  assert.equal(seen.join(''), 'n1\nn2\nn3\n')
  assert.equal(result.exitCode, 0)
})

test('commands.list and kill', async () => {
  const handle = await sbx.commands.run('sleep 120', { background: true })
  assert.ok((await sbx.commands.list()).some((process) => process.pid === handle.pid))
  assert.equal(await sbx.commands.kill(handle.pid), true)
})

test('a pty reports its size after a resize', async () => {
  const output = []
  const handle = await sbx.pty.create({ rows: 24, cols: 80, onData: (data) => output.push(Buffer.from(data)) })
  await sbx.pty.resize(handle.pid, { rows: 31, cols: 99 })
  await sbx.pty.sendInput(handle.pid, new TextEncoder().encode('stty size; exit\n'))
  await handle.wait()
  assert.match(Buffer.concat(output).toString(), /31 99/)
})

test('files write, read, list, exists, makeDir, rename, remove', async () => {
  await sbx.files.write('/home/user/js/a.txt', 'from js')
  assert.equal(await sbx.files.read('/home/user/js/a.txt'), 'from js')
  assert.ok((await sbx.files.list('/home/user/js')).some((entry) => entry.name === 'a.txt'))
  assert.equal(await sbx.files.exists('/home/user/js/a.txt'), true)
  assert.equal(await sbx.files.makeDir('/home/user/js/d'), true)
  await sbx.files.rename('/home/user/js/a.txt', '/home/user/js/d/b.txt')
  assert.equal(await sbx.files.read('/home/user/js/d/b.txt'), 'from js')
  await sbx.files.remove('/home/user/js')
  assert.equal(await sbx.files.exists('/home/user/js'), false)
  await assert.rejects(sbx.files.read('/home/user/none'))
})

test('setTimeout, list, another key refused', async () => {
  await sbx.setTimeout(600_000)
  const info = await sbx.getInfo()
  assert.ok(info.endAt.getTime() - Date.now() > 500_000)
  const paginator = Sandbox.list()
  const items = await paginator.nextItems()
  assert.ok(items.some((item) => item.sandboxId === sbx.sandboxId))
  await assert.rejects(Sandbox.connect(sbx.sandboxId, { apiKey: process.env.E2B_OTHER_KEY }))
})

test('kill ends the sandbox', async () => {
  const doomed = await Sandbox.create()
  await doomed.kill()
  assert.equal(await doomed.isRunning(), false)
  await assert.rejects(doomed.commands.run('true'))
})
