// Opens a page that uses Segment's browser library (analytics-next, from
// npm) in headless Chromium, pointed at a running Kindred, and reports
// what the page sent. Driven by tests/tests/browser.rs:
//
//   node run.mjs <kindred URL> <write key> <user id> <npm|batching|snippet>
//
// The page is served here, on another origin than Kindred (so every call
// is cross-origin, as on a real site); Chromium may reach no other host.
// Prints one JSON line: the requests to Kindred with their answers, the
// events the page got acknowledged, and the page's console errors.
import http from 'node:http'
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'
import { launch } from './chromium.mjs'

const [kindred, writeKey, user, mode] = process.argv.slice(2)
if (!mode) {
  console.error('usage: node run.mjs <kindred URL> <write key> <user id> <npm|batching|snippet>')
  process.exit(2)
}
const here = path.dirname(fileURLToPath(import.meta.url))
const umd = path.join(here, 'node_modules/@segment/analytics-next/dist/umd')
/** The events the page sends (see page/app.js and page/snippet.html). */
const EXPECTED_EVENTS = 5

// The npm path: the page's script bundled as a site's build would.
const bundle = await esbuild.build({
  entryPoints: [path.join(here, 'page/app.js')],
  bundle: true,
  format: 'esm',
  target: 'es2020',
  write: false,
  logLevel: 'error',
})
const appJs = bundle.outputFiles[0].text

const pages = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://page')
  const send = (type, body) => {
    res.writeHead(200, { 'content-type': type })
    res.end(body)
  }
  if (url.pathname === '/app.js') return send('text/javascript', appJs)
  if (url.pathname === '/npm.html') return send('text/html', fs.readFileSync(path.join(here, 'page/npm.html')))
  if (url.pathname === '/snippet.html') return send('text/html', fs.readFileSync(path.join(here, 'page/snippet.html')))
  // The self-hosted copy of dist/umd/ the snippet loads.
  const m = url.pathname.match(/^\/analytics-next\/bundles\/([\w.-]+\.js)$/)
  if (m && fs.existsSync(path.join(umd, m[1]))) return send('text/javascript', fs.readFileSync(path.join(umd, m[1])))
  res.writeHead(404)
  res.end()
})
await new Promise((resolve) => pages.listen(0, '127.0.0.1', resolve))
// `localhost` for the page, 127.0.0.1 for Kindred: two origins.
const pageOrigin = `http://localhost:${pages.address().port}`

const browser = await launch()
const result = { requests: [], acknowledged: 0, console: [], visit: null, origin: pageOrigin }
let failure = null
try {
  const context = await browser.newContext()
  const page = await context.newPage()
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') result.console.push(`${m.type()}: ${m.text()}`)
  })
  page.on('pageerror', (e) => result.console.push(`pageerror: ${e.message}`))
  page.on('requestfailed', (r) => {
    if (!r.url().startsWith(pageOrigin)) {
      result.requests.push({ method: r.method(), url: r.url(), failed: r.failure()?.errorText })
    }
  })
  page.on('response', async (r) => {
    const req = r.request()
    if (r.url().startsWith(pageOrigin)) return
    const entry = { method: req.method(), url: r.url(), status: r.status() }
    result.requests.push(entry)
    const body = req.postData()
    if (req.method() === 'POST' && r.status() === 200 && body) {
      const json = JSON.parse(body)
      result.acknowledged += Array.isArray(json.batch) ? json.batch.length : 1
    }
  })
  const file = mode === 'snippet' ? 'snippet.html' : 'npm.html'
  const query = new URLSearchParams({ kindred, writeKey, user, mode })
  await page.goto(`${pageOrigin}/${file}?${query}`)
  const deadline = Date.now() + 30_000
  while (Date.now() < deadline && result.acknowledged < EXPECTED_EVENTS) {
    await page.waitForTimeout(100)
  }
  result.visit = await page.evaluate(() => window.kindredVisit ?? null)
  // Anything sent late (a retry, a second batch) would show up here.
  await page.waitForTimeout(500)
} catch (e) {
  failure = e
} finally {
  await browser.close()
  pages.close()
}
console.log(JSON.stringify(result))
if (failure) {
  console.error(failure)
  process.exit(1)
}
