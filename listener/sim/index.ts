// Cloud simulators for tests and demos. The framework lives in server.ts;
// each simulated cloud adds its own file and re-exports it here.
export * from './sim-server.js';
export * from './yonbip.js';
