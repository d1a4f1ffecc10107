// Headless Chromium (Debian's, or $CHROMIUM) for the browser drivers:
// no network but this machine (no CDN, no Segment), nothing in the
// background.
import { chromium } from 'playwright-core'

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE *.localhost , EXCLUDE 127.0.0.1',
    ],
  })
}
