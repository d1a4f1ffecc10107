// A page that bundles the npm package, as the README's "Websites" section
// shows: only `cdnURL` points it at Kindred (the library reads the rest
// from Kindred's settings route). The write key, Kindred's URL, the user
// and the delivery strategy come from the page's query string.
import { AnalyticsBrowser } from '@segment/analytics-next'

const params = new URLSearchParams(location.search)
const writeKey = params.get('writeKey')
const user = params.get('user')

const options =
  params.get('mode') === 'batching'
    ? {
        integrations: {
          'Segment.io': {
            deliveryStrategy: { strategy: 'batching', config: { size: 3, timeout: 300 } },
          },
        },
      }
    : {}

export const analytics = AnalyticsBrowser.load(
  { writeKey, cdnURL: params.get('kindred') },
  options
)

async function visit() {
  await analytics.page()
  await analytics.identify(user, { email: `${user}@Example.com`, plan: 'pro' })
  await analytics.track('Product Viewed', { sku: 'sku-1', price: 12.5 })
  await analytics.page('Docs', 'Install')
  await analytics.track('Signed Up', { method: 'browser' })
}

visit().then(
  () => (window.kindredVisit = 'done'),
  (e) => (window.kindredVisit = `failed: ${e}`)
)
