// The inbound receivers each cloud registers (listener/inbound-server.ts).
// Each cloud's module calls registerInboundRoute when imported; list it here.
import './inbound/nuonuo-callback.js';
import './inbound/asn-webhook.js';
import './inbound/yonbip-events.js';
export {};
