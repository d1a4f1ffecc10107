// Walks the operator's explorer (/ui) in headless Chromium as a person
// would, and reports what each page showed. Driven by tests/tests/ui.rs:
//
//   node ui.mjs <kindred URL> <access token> <admin token> <search> <second search> <screenshot dir>
//
// Prints one JSON line; the Rust test makes the assertions. Chromium may
// reach no host but this machine (the pages must need nothing else).
import fs from 'node:fs'
import path from 'node:path'
import { launch } from './chromium.mjs'

const [kindred, accessToken, adminToken, search, secondSearch, shots] = process.argv.slice(2)
if (!shots) {
  console.error('usage: node ui.mjs <kindred URL> <access token> <admin token> <search> <second search> <screenshot dir>')
  process.exit(2)
}
fs.mkdirSync(shots, { recursive: true })

const browser = await launch()
const report = { console: [], urls: [], offsite: [], steps: {} }
let failure = null
const text = async (page, selector) =>
  (await page.locator(selector).allInnerTexts()).join('\n')
const shot = (page, name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true })

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } })
  const page = await context.newPage()
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') report.console.push(`${m.type()}: ${m.text()}`)
  })
  page.on('pageerror', (e) => report.console.push(`pageerror: ${e.message}`))
  page.on('request', (r) => {
    report.urls.push(r.url())
    if (!r.url().startsWith(kindred)) report.offsite.push(r.url())
  })

  // A wrong token is refused, and no session cookie is set.
  await page.goto(`${kindred}/ui`)
  await page.fill('input[name=token]', 'at_thisisnotatoken000000000')
  const refused = await Promise.all([
    page.waitForNavigation(),
    page.click('button[type=submit]'),
  ]).then(([r]) => r)
  report.steps.wrong_token = {
    status: refused.status(),
    text: await text(page, 'main'),
    cookies: (await context.cookies()).map((c) => c.name),
    // Chromium logs the 401 answer itself as a console error.
    console: report.console.splice(0),
  }

  // Sign in with the access token; the cookie is HttpOnly and SameSite.
  await page.fill('input[name=token]', accessToken)
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')])
  report.steps.signed_in = {
    url: page.url(),
    cookies: (await context.cookies()).map((c) => ({
      name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path,
    })),
    script_can_read_cookie: await page.evaluate(() => document.cookie),
    header: await text(page, 'header'),
  }

  // Search the merged profile by its email, in another case.
  await page.fill('input[name=q]', search)
  const found = await Promise.all([page.waitForNavigation(), page.press('input[name=q]', 'Enter')]).then(([r]) => r)
  report.steps.profile = {
    status: found.status(),
    url: page.url(),
    csp: (await found.allHeaders())['content-security-policy'] ?? null,
    graph: (await page.locator('figure.graph svg text').allTextContents()),
    traits: await text(page, 'h2:has-text("Traits") + table'),
    computed: await text(page, 'h2:has-text("Audiences and computed traits") + *'),
    identifiers: await text(page, 'h2:has-text("Identifiers") + table'),
    refused: await text(page, 'h2:has-text("Refused by merge protection") + *'),
    events: await text(page, 'h2:has-text("Events") ~ table'),
    script_ran: await page.evaluate(() => window.pwned ?? null),
    script_elements: await page.locator('main script, main img').count(),
  }
  await shot(page, 'profile')

  // The events filtered by name.
  await page.fill('input[name=include]', 'Order Completed')
  await Promise.all([page.waitForNavigation(), page.click('form.filters button')])
  report.steps.filtered = { url: page.url(), events: await text(page, 'h2:has-text("Events") ~ table') }

  // Her account, from the profile's account links.
  await Promise.all([page.waitForNavigation(), page.click('h2:has-text("Accounts") + table a')])
  report.steps.account = { url: page.url(), text: await text(page, 'main') }
  await shot(page, 'account')

  // The other side of the shared device.
  await page.fill('input[name=q]', secondSearch)
  await Promise.all([page.waitForNavigation(), page.press('input[name=q]', 'Enter')])
  report.steps.other = {
    url: page.url(),
    graph: (await page.locator('figure.graph svg text').allTextContents()),
    refused: await text(page, 'h2:has-text("Refused by merge protection") + *'),
  }
  await shot(page, 'shared-device')

  // The audience and its members.
  await page.click('nav a:has-text("Audiences")')
  await page.waitForLoadState()
  report.steps.computations = { text: await text(page, 'main') }
  await page.click('main table a >> nth=0')
  await page.waitForLoadState()
  report.steps.audience = { url: page.url(), text: await text(page, 'main') }
  await shot(page, 'audience')

  // Read-only settings and the destinations table for an access token.
  await page.click('nav a:has-text("Identity settings")')
  await page.waitForLoadState()
  report.steps.settings_read = {
    editable: await page.locator('textarea').count(),
    text: await text(page, 'main'),
  }
  await page.click('nav a:has-text("Destinations")')
  await page.waitForLoadState()
  report.steps.destinations_read = { text: await text(page, 'main') }

  // Sign out, then in with the admin token: settings become editable.
  await Promise.all([page.waitForNavigation(), page.click('header button')])
  report.steps.signed_out = { cookies: (await context.cookies()).map((c) => c.name), text: await text(page, 'main') }
  await page.fill('input[name=token]', adminToken)
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')])
  await page.goto(`${kindred}/ui/settings`)
  report.steps.settings_admin = {
    editable: await page.locator('textarea').count(),
    header: await text(page, 'header'),
  }
  await shot(page, 'settings')
  await page.goto(`${kindred}/ui/destinations`)
  report.steps.destinations_admin = { text: await text(page, 'main') }
  await shot(page, 'destinations')
} catch (e) {
  failure = e
} finally {
  await browser.close()
}
console.log(JSON.stringify(report))
if (failure) {
  console.error(failure)
  process.exit(1)
}
