/**
 * The simulated clouds `erp-cloud sim --cloud NAME` can start. Each cloud's
 * simulator is started by a registerSimCloud call at the bottom of this file
 * (not by the module itself, which would run before this file has loaded).
 */
import { startBaiwangSim } from './baiwang.js';
import { startNuonuoSim } from './nuonuo.js';
import { startSim, webhookRoutes, type SimServer } from './sim-server.js';
import { startYonbipSim } from './yonbip.js';

export interface SimStartOptions {
  port: number;
  host: string;
}

const clouds = new Map<string, (o: SimStartOptions) => Promise<SimServer>>();

export function registerSimCloud(name: string, start: (o: SimStartOptions) => Promise<SimServer>): void {
  clouds.set(name, start);
}

export function simCloudNames(): string[] {
  return [...clouds.keys()].sort();
}

export function startSimCloud(name: string, o: SimStartOptions): Promise<SimServer> {
  const start = clouds.get(name);
  if (!start) throw new Error(`no simulated cloud "${name}"; there are: ${simCloudNames().join(', ')}`);
  return start(o);
}

registerSimCloud('webhook', (o) => startSim({ port: o.port, host: o.host, routes: webhookRoutes(), name: 'webhook' }));

// the simulated platform's app key and secret come from the environment, like the listener's
registerSimCloud('nuonuo', (o) => {
  const appKey = process.env.ERP_CLOUD_SIM_NUONUO_APP_KEY;
  const appSecret = process.env.ERP_CLOUD_SIM_NUONUO_APP_SECRET;
  if (!appKey || !appSecret) throw new Error('sim --cloud nuonuo needs ERP_CLOUD_SIM_NUONUO_APP_KEY and ERP_CLOUD_SIM_NUONUO_APP_SECRET');
  return startNuonuoSim({ port: o.port, host: o.host, appKey, appSecret });
});

registerSimCloud('baiwang', (o) => {
  const env = (k: string) => process.env[`ERP_CLOUD_SIM_BAIWANG_${k}`];
  const [appKey, appSecret, username, password, salt] = ['APP_KEY', 'APP_SECRET', 'USERNAME', 'PASSWORD', 'SALT'].map(env);
  if (!appKey || !appSecret || !username || !password || !salt) {
    throw new Error('sim --cloud baiwang needs ERP_CLOUD_SIM_BAIWANG_APP_KEY, _APP_SECRET, _USERNAME, _PASSWORD and _SALT');
  }
  return startBaiwangSim({ port: o.port, host: o.host, appKey, appSecret, username, password, salt });
});

registerSimCloud('yonbip', (o) => startYonbipSim(o));
