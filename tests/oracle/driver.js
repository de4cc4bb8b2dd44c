'use strict';
// Reference sessions for tests/test_differential.py.
//
// Runs the session plugin of Snowplow's published React Native tracker, with @snowplow/tracker-core
// building the payloads, under a controlled clock. Reads on stdin
//   {"foregroundTimeout": s, "backgroundTimeout": s,
//    "devices": [{"deviceId": "...", "base64": bool,
//                 "events": [{"t": ms_epoch, "kind": "...", "contexts": [optional entities]}]}]}
// and writes one JSON line per event to stdout:
//   {"key": deviceId, "event": <payload without client_session>, "oracle": <client_session data>}
const path = require('node:path');
const core = require('@snowplow/tracker-core');
const { v4: uuidv4 } = require('uuid');

// The package exports only its entry point; the session plugin is loaded by path so that nothing
// else of the tracker (which needs react-native) is loaded.
const { newSessionPlugin } = require(
  path.join(path.dirname(require.resolve('@snowplow/react-native-tracker')), 'plugins', 'session', 'index.js'),
);

const CLIENT_SESSION = 'iglu:com.snowplowanalytics.snowplow/client_session/jsonschema/1-0-2';
const SCHEMAS = {
  screen_view: 'iglu:com.snowplowanalytics.mobile/screen_view/jsonschema/1-0-0',
  background: 'iglu:com.snowplowanalytics.snowplow/application_background/jsonschema/1-0-0',
  foreground: 'iglu:com.snowplowanalytics.snowplow/application_foreground/jsonschema/1-0-0',
};

// Controlled clock: `new Date()` and `Date.now()` return the timeline's current time.
let now = 0;
const RealDate = Date;
globalThis.Date = class extends RealDate {
  constructor(...args) {
    if (args.length === 0) {
      super(now);
    } else {
      super(...args);
    }
  }

  static now() {
    return now;
  }
};

function memoryStorage() {
  const items = new Map();
  return {
    getItem: async (key) => items.get(key) ?? null,
    setItem: async (key, value) => {
      items.set(key, value);
    },
    removeItem: async (key) => {
      items.delete(key);
    },
  };
}

function buildEvent(kind, index) {
  switch (kind) {
    case 'screen_view':
      return core.buildSelfDescribingEvent({
        event: { schema: SCHEMAS.screen_view, data: { name: `screen-${index}`, id: uuidv4() } },
      });
    case 'background':
    case 'foreground':
      return core.buildSelfDescribingEvent({ event: { schema: SCHEMAS[kind], data: {} } });
    case 'struct':
      return core.buildStructEvent({ category: 'shop', action: 'tap', label: `item-${index}`, value: index });
    case 'page_view':
      return core.buildPageView({ pageUrl: `https://example.com/page/${index}`, pageTitle: `Page ${index}` });
    default:
      throw new Error(`unknown event kind: ${kind}`);
  }
}

// Removes the client_session entity from the payload's contexts, keeping their encoding.
function takeSessionEntity(payload) {
  const encoded = payload.cx !== undefined;
  const key = encoded ? 'cx' : 'co';
  const contexts = JSON.parse(encoded ? Buffer.from(payload[key], 'base64url').toString('utf8') : payload[key]);
  const session = contexts.data.find((entity) => entity.schema === CLIENT_SESSION);
  const rest = contexts.data.filter((entity) => entity !== session);
  const event = { ...payload };
  delete event[key];
  if (rest.length > 0) {
    const json = JSON.stringify({ ...contexts, data: rest });
    event[key] = encoded ? Buffer.from(json, 'utf8').toString('base64url') : json;
  }
  return { event, oracle: session.data };
}

async function runDevice(device, config, out) {
  if (device.events.length === 0) {
    return;
  }
  // The plugin starts its timeout clock when it is created: create it at the first event's time.
  now = device.events[0].t;
  const namespace = device.deviceId;
  const session = await newSessionPlugin({
    asyncStorage: memoryStorage(),
    namespace,
    sessionContext: true,
    foregroundSessionTimeout: config.foregroundTimeout,
    backgroundSessionTimeout: config.backgroundTimeout,
  });
  const emitted = [];
  const tracker = core.trackerCore({
    base64: device.base64,
    corePlugins: [session.plugin],
    callback: (payloadBuilder) => emitted.push(payloadBuilder.build()),
  });
  tracker.setPlatform('mob');
  tracker.setTrackerVersion(`rn-${core.version}`);
  tracker.setTrackerNamespace(namespace);
  device.events.forEach((spec, index) => {
    now = spec.t;
    tracker.track(buildEvent(spec.kind, index), spec.contexts);
  });
  for (const payload of emitted) {
    out.push(JSON.stringify({ key: device.deviceId, ...takeSessionEntity(payload) }));
  }
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) {
    chunks.push(chunk);
  }
  const config = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const out = [];
  for (const device of config.devices) {
    await runDevice(device, config, out);
  }
  process.stdout.write(out.map((line) => `${line}\n`).join(''));
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
