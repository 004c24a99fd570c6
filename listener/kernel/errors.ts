/**
 * Our SQLSTATEs, mirrored from the registry at the top of
 * sql/migrations/0001_cloud_delivery_engine.sql. Tests assert these codes,
 * never message text.
 */
export const SqlState = {
  unknownEndpoint: 'EC001',
  invalidOperation: 'EC002',
  invalidPayload: 'EC003',
  duplicateRequestId: 'EC004',
  messageNotFound: 'EC005',
  messageNotReplayable: 'EC006',
  reasonRequired: 'EC007',
  invalidEndpointSetting: 'EC008',
  messageNotSkippable: 'EC009',
  invalidLimitSetting: 'EC010',
  invalidAllowlistSetting: 'EC011',
  invalidQuotaSetting: 'EC012',
  invalidSetting: 'EC013',
  invalidProviderToken: 'EC014',
  invalidSendSlotRequest: 'EC015', // sql/migrations/0012_rate_limit_respacing.sql; give_back_messages: 0017
  // System_Vault (sql/migrations/0004_vault.sql)
  secretNotFound: 'EC020',
  vaultKeyMismatch: 'EC021',
  vaultKeyInvalid: 'EC022',
  invalidSecretName: 'EC023',
  secretValueEmpty: 'EC024',
  secretUndecryptable: 'EC025',
  vaultKeyUnchanged: 'EC026',
  // E-invoicing (sql/migrations/0007_e_invoicing.sql)
  invoiceTaxIdMalformed: 'EI001',
  invoiceTaxIdCheckDigit: 'EI002',
  invoiceTaxCodeInvalid: 'EI003',
  invoiceTaxRateInvalid: 'EI004',
  invoiceLineAmountInvalid: 'EI005',
  invoiceLinesMissingOrTooMany: 'EI006',
  invoiceLineTaxTolerance: 'EI007',
  invoiceTotalTaxTolerance: 'EI008',
  invoiceBuyerNameMissing: 'EI009',
  invoiceSpecialNeedsTaxId: 'EI010',
  invoiceLineOverLimit: 'EI011',
  invoicingNotConfigured: 'EI012',
  reversalInvoiceNotIssued: 'EI013',
  reversalReasonInvalid: 'EI014',
  reversalLineUnknown: 'EI015',
  reversalAlreadyUnderway: 'EI016',
  invoicingSettingInvalid: 'EI017',
  invoiceReissueRefused: 'EI018',
  invoiceRequeryRefused: 'EI019',
  // e-invoicing validation hardening (sql/migrations/0013_invoice_validation_hardening.sql)
  invoiceUsccForbiddenCharacter: 'EI020',
  invoiceUsccAuthorityOrType: 'EI021',
  invoiceUsccRegion: 'EI022',
  invoiceTextTooLong: 'EI023',
  invoiceTextLimitSettingInvalid: 'EI024',
  // the e-invoicing contract (sql/migrations/0019_invoice_contract.sql)
  invoiceDocumentMalformed: 'EI025',
  invoiceSourceUnknown: 'EI026',
  invoiceSourceRegistrationInvalid: 'EI027',
  reversalReferenceReused: 'EI028',
  invoiceReissueWithoutBuyer: 'EI029',
  invoiceDocumentUnknown: 'EI030',
  // supplier collaboration (sql/migrations/0008_supplier_collaboration.sql)
  poStatusChangeNotAllowed: 'ES001',
  poWithoutLines: 'ES002',
  poFinal: 'ES003',
  asnMalformed: 'ES004',
  sharedDbSetupRefused: 'ES005',
  invalidAsnPullSetting: 'ES006',
  unknownPortalSupplier: 'ES008',
  poDeleteNotAllowed: 'ES009',
  asnEventIdConflict: 'ES017',
  eventTypeNotAsn: 'ES018',
  // the procurement contract (sql/migrations/0020_procurement_contract.sql)
  orderDocumentMalformed: 'ES019',
  procurementSourceUnknown: 'ES020',
  procurementSourceInvalid: 'ES021',
  orderNumberTaken: 'ES022',
  orderUnknown: 'ES023',
  // ASN rejection reasons (scm.asn.reject_code), stored, never raised
  asnUnknownSupplier: 'ES010',
  asnUnknownPurchaseOrder: 'ES011',
  asnOtherSuppliersOrder: 'ES012',
  asnLineMismatch: 'ES013',
  asnQuantityNotPositive: 'ES014',
  asnQuantityOverOpen: 'ES015',
  asnOrderNotOpen: 'ES016',
  // single sign-on (sql/migrations/0009_sso.sql)
  ssoUnknownClient: 'EO001',
  ssoClientExists: 'EO002',
  ssoInvalidUri: 'EO003',
  ssoInvalidClient: 'EO004',
  ssoClientDisabled: 'EO005',
  ssoUnknownUser: 'EO006',
  ssoUserInactive: 'EO007',
  ssoNoLoginUri: 'EO008',
  ssoRotationPending: 'EO009',
  ssoInvalidKey: 'EO010',
  ssoIssuerUnknown: 'EO011',
  ssoVaultNameNotSso: 'EO012',
  ssoTicketUnknown: 'EO020',
  ssoTicketUsed: 'EO021',
  ssoTicketExpired: 'EO022',
  ssoTicketOtherClient: 'EO023',
  ssoTicketOtherBrowser: 'EO024',
  ssoAuditRetentionTooShort: 'EO025',
  ssoSecretGraceInvalid: 'EO026',
  ssoThrottleInvalid: 'EO027',
  ssoInvalidUser: 'EO028',
  ssoInvalidClientSetting: 'EO029',
  // the operations console (sql/migrations/0025_operations_console.sql)
  consoleNoUser: 'EA001',
  consoleRoleRefused: 'EA002',
  consoleRoleInvalid: 'EA003',
} as const;

export type SqlStateName = keyof typeof SqlState;

/** A PostgreSQL error as a one-line message a DBA can act on (message, then hint). */
export function describePgError(err: unknown): string {
  const e = err as { code?: string; message?: string; hint?: string; detail?: string };
  const parts = [e.code ? `[${e.code}] ${e.message ?? ''}` : String(e.message ?? err)];
  if (e.detail) parts.push(e.detail);
  if (e.hint) parts.push(`Hint: ${e.hint}`);
  return parts.join(' — ');
}
