/**
 * oidc-provider's storage in PostgreSQL (table sso.oidc_payload), so sessions,
 * interactions, grants, codes and tokens survive a restart and are shared by
 * every provider instance. Clients are the exception: model "Client" reads the
 * registrations in sso.client (sso.client_metadata), so a registration or a
 * disable applies on the next request everywhere.
 *
 * The interface (find, upsert, consume, destroy, revokeByGrantId, findByUid,
 * findByUserCode) is oidc-provider's Adapter; expiresIn is in seconds, consume
 * marks a one-time artefact used (the provider reads `consumed` back).
 * Revocation marks rows (revoked_at) instead of deleting them: the provider
 * no longer finds them, the audit still can (sso.token_owner).
 */
import { errors, type Adapter, type AdapterPayload } from 'oidc-provider';
import type pg from 'pg';

export const adapterSql = {
  upsert: `insert into sso.oidc_payload (model, id, payload, grant_id, uid, user_code, expires_at)
           values ($1, $2, $3, $4, $5, $6, case when $7::int is null then null else now() + make_interval(secs => $7::int) end)
           on conflict (model, id) do update set payload = excluded.payload, grant_id = excluded.grant_id, uid = excluded.uid,
             user_code = excluded.user_code, expires_at = excluded.expires_at`,
  find: `select payload, extract(epoch from consumed_at)::bigint as consumed from sso.oidc_payload
          where model = $1 and id = $2 and (expires_at is null or expires_at > now()) and revoked_at is null`,
  findByUid: `select payload, extract(epoch from consumed_at)::bigint as consumed from sso.oidc_payload
               where model = $1 and uid = $2 and (expires_at is null or expires_at > now()) and revoked_at is null`,
  findByUserCode: `select payload, extract(epoch from consumed_at)::bigint as consumed from sso.oidc_payload
                    where model = $1 and user_code = $2 and (expires_at is null or expires_at > now()) and revoked_at is null`,
  // only the first of concurrent redemptions marks it; the others find no row
  consume: `update sso.oidc_payload set consumed_at = now() where model = $1 and id = $2 and consumed_at is null`,
  // a code redeemed twice: everything issued under its grant goes, the grant too (RFC 6749 §4.1.2).
  // Revoked rows are marked, not deleted, so the audit of a later attempt with
  // them still names the user and client (sso.token_owner); they go at expiry.
  revokeGrantOf: `update sso.oidc_payload p set revoked_at = coalesce(p.revoked_at, now())
                   from
                   (select payload ->> 'grantId' as grant_id from sso.oidc_payload where model = $1 and id = $2) c
                   where c.grant_id is not null and (p.grant_id = c.grant_id or (p.model = 'Grant' and p.id = c.grant_id))`,
  destroy: `delete from sso.oidc_payload where model = $1 and id = $2`,
  revokeByGrantId: `update sso.oidc_payload set revoked_at = coalesce(revoked_at, now()) where model = $1 and grant_id = $2`,
  clientMetadata: `select sso.client_metadata($1) as metadata`,
} as const;

type Row = { payload: AdapterPayload; consumed: string | null };

function toPayload(row: Row | undefined): AdapterPayload | undefined {
  if (!row) return undefined;
  return row.consumed === null ? row.payload : { ...row.payload, consumed: Number(row.consumed) };
}

export class PgAdapter implements Adapter {
  constructor(private readonly model: string, private readonly pool: Pick<pg.Pool, 'query'>) {}

  async upsert(id: string, payload: AdapterPayload, expiresIn: number): Promise<void> {
    if (this.model === 'Client') throw new Error('clients are registered with sso.register_client, not through the provider');
    await this.pool.query(adapterSql.upsert, [
      this.model, id, payload, payload.grantId ?? null, payload.uid ?? null, payload.userCode ?? null,
      typeof expiresIn === 'number' ? Math.ceil(expiresIn) : null,
    ]);
  }

  async find(id: string): Promise<AdapterPayload | undefined> {
    if (this.model === 'Client') {
      const { rows } = await this.pool.query<{ metadata: AdapterPayload | null }>(adapterSql.clientMetadata, [id]);
      return rows[0]?.metadata ?? undefined;
    }
    const { rows } = await this.pool.query<Row>(adapterSql.find, [this.model, id]);
    return toPayload(rows[0]);
  }

  async findByUid(uid: string): Promise<AdapterPayload | undefined> {
    const { rows } = await this.pool.query<Row>(adapterSql.findByUid, [this.model, uid]);
    return toPayload(rows[0]);
  }

  async findByUserCode(userCode: string): Promise<AdapterPayload | undefined> {
    const { rows } = await this.pool.query<Row>(adapterSql.findByUserCode, [this.model, userCode]);
    return toPayload(rows[0]);
  }

  async consume(id: string): Promise<void> {
    const { rowCount } = await this.pool.query(adapterSql.consume, [this.model, id]);
    // two token requests for one code both passed the provider's "consumed?"
    // check: only the one whose update marked it goes on to get tokens
    if (!rowCount) {
      // the winner's tokens may already exist: a code that was redeemed twice must not stay good for either (RFC 6749 §4.1.2)
      await this.pool.query(adapterSql.revokeGrantOf, [this.model, id]);
      throw new errors.InvalidGrant(`${this.model === 'AuthorizationCode' ? 'authorization code' : this.model} already used`);
    }
  }

  async destroy(id: string): Promise<void> {
    await this.pool.query(adapterSql.destroy, [this.model, id]);
  }

  async revokeByGrantId(grantId: string): Promise<void> {
    await this.pool.query(adapterSql.revokeByGrantId, [this.model, grantId]);
  }
}
