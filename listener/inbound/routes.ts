// The inbound receivers each cloud registers (listener/inbound-server.ts).
// Each cloud's module calls registerInboundRoute when imported; list it here.
import './nuonuo-callback.js';
import './asn-webhook.js';
import './yonbip-events.js';
export {};
