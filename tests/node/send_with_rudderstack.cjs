// Sends identify, track and group calls with RudderStack's Node.js SDK
// (@rudderstack/rudder-sdk-node, gzip on), pointed at a Kindred server
// with `dataPlaneUrl`. Exits non-zero if the SDK reports any error.
// Usage: node send_with_rudderstack.cjs WRITE_KEY DATA_PLANE_URL
const Analytics = require('@rudderstack/rudder-sdk-node');

const [writeKey, dataPlaneUrl] = process.argv.slice(2);
const errors = [];
const client = new Analytics(writeKey, {
  dataPlaneUrl,
  gzip: true,
  retryCount: 0,
  flushAt: 50,
  flushInterval: 60000,
  errorHandler: (e) => errors.push(String(e)),
});

client.identify({
  userId: 'node-user',
  anonymousId: 'node-anon',
  traits: { email: 'Node.User@Example.com', plan: 'team' },
});
client.track({ userId: 'node-user', event: 'Order Completed', properties: { revenue: 7 } });
client.group({ userId: 'node-user', groupId: 'acct-node', traits: { name: 'Node Inc' } });
client.flush((err) => {
  if (err || errors.length) {
    console.error(String(err), errors.join('\n'));
    process.exit(1);
  }
  console.log('sent');
  process.exit(0);
});
