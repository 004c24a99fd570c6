/**
 * The crypto of YonBIP's event push (cloud-protocols.md §4.5), WeChat-work style:
 *
 *   aesKey    = base64decode(key43 + "=")   key43: the appSecret without '-', padded with '0' or cut to 43 chars (32 bytes)
 *   encrypt   = base64(AES-256-CBC/NoPadding(key = aesKey, iv = aesKey[0..16],
 *                 PKCS7_32(16 random bytes ‖ uint32 BE length ‖ message ‖ appKey)))
 *   signature = hex(SHA1(sorted [token (= appSecret), timestamp, nonce, encrypt] joined))   (sha256: the same inputs)
 *
 * The sorting of the signed parts is assumed from WeChat's scheme [U], and so is the
 * SHA-256 variant's input (apps created after 2022-07-29): check both against a tenant.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, timingSafeEqual } from 'node:crypto';

/** The PKCS7 block size of this scheme: 32 bytes, not AES's 16. */
export const PAD_BLOCK = 32;

export type SignatureAlgorithm = 'sha1' | 'sha256';

/** Why an event could not be opened; the receiver answers each with its own status. */
export class YonbipCryptoError extends Error {
  constructor(readonly reason: 'bad_base64' | 'bad_length' | 'bad_padding' | 'wrong_app_key' | 'bad_key', message: string) {
    super(message);
    this.name = 'YonbipCryptoError';
  }
}

/** The 32-byte AES key (its first 16 bytes are the IV) from the app secret. */
export function deriveAesKey(appSecret: string): Buffer {
  const stripped = appSecret.replace(/-/g, '');
  const key43 = stripped.length >= 43 ? stripped.slice(0, 43) : stripped.padEnd(43, '0');
  if (!/^[A-Za-z0-9+/]{43}$/.test(key43)) {
    throw new YonbipCryptoError('bad_key', 'the app secret has characters outside base64: no AES key can be derived from it');
  }
  const key = Buffer.from(`${key43}=`, 'base64');
  if (key.length !== 32) throw new YonbipCryptoError('bad_key', `the derived AES key has ${key.length} bytes, not 32`);
  return key;
}

/** PKCS7 with a 32-byte block: 1..32 bytes, each holding the pad length. */
export function pkcs7Pad(data: Buffer, block = PAD_BLOCK): Buffer {
  const n = block - (data.length % block);
  return Buffer.concat([data, Buffer.alloc(n, n)]);
}

function pkcs7Unpad(data: Buffer, block = PAD_BLOCK): Buffer {
  const n = data.length > 0 ? data[data.length - 1]! : 0;
  if (n < 1 || n > block || n > data.length) throw new YonbipCryptoError('bad_padding', `the padding length byte is ${n}, not 1..${block}`);
  for (let i = data.length - n; i < data.length; i++) {
    if (data[i] !== n) throw new YonbipCryptoError('bad_padding', 'the padding bytes are not all equal to its length');
  }
  return data.subarray(0, data.length - n);
}

/** The `encrypt` field for a message: base64 of the ciphertext. `random` (16 bytes) is for tests; default random. */
export function encryptEvent(message: string, appKey: string, aesKey: Buffer, random: Buffer = randomBytes(16)): string {
  if (random.length !== 16) throw new Error('the random prefix is 16 bytes');
  const msg = Buffer.from(message, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(msg.length);
  const plain = pkcs7Pad(Buffer.concat([random, len, msg, Buffer.from(appKey, 'utf8')]));
  const cipher = createCipheriv('aes-256-cbc', aesKey, aesKey.subarray(0, 16));
  cipher.setAutoPadding(false);
  return Buffer.concat([cipher.update(plain), cipher.final()]).toString('base64');
}

/**
 * Opens an `encrypt` field: the message (UTF-8 text). Throws YonbipCryptoError when it is not
 * base64, not whole AES blocks, its padding or length is wrong, or it ends in another app's key.
 */
export function decryptEvent(encrypt: string, aesKey: Buffer, expectedAppKey: string): string {
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(encrypt) || encrypt.length % 4 !== 0) throw new YonbipCryptoError('bad_base64', 'encrypt is not base64');
  const data = Buffer.from(encrypt, 'base64');
  if (data.length === 0 || data.length % PAD_BLOCK !== 0) {
    throw new YonbipCryptoError('bad_length', `the ciphertext has ${data.length} bytes, not a multiple of ${PAD_BLOCK}`);
  }
  const decipher = createDecipheriv('aes-256-cbc', aesKey, aesKey.subarray(0, 16));
  decipher.setAutoPadding(false);
  const plain = pkcs7Unpad(Buffer.concat([decipher.update(data), decipher.final()]));
  if (plain.length < 20) throw new YonbipCryptoError('bad_length', 'the plaintext is shorter than its 20-byte header');
  const len = plain.readUInt32BE(16);
  if (20 + len > plain.length) throw new YonbipCryptoError('bad_length', `the message length ${len} runs past the plaintext`);
  const trailing = plain.subarray(20 + len);
  const want = Buffer.from(expectedAppKey, 'utf8');
  if (trailing.length !== want.length || !timingSafeEqual(trailing, want)) {
    throw new YonbipCryptoError('wrong_app_key', 'the event was encrypted for another app (its trailing appKey is not ours)');
  }
  return plain.subarray(20, 20 + len).toString('utf8');
}

/** The holder's signature: hex digest over the four parts, sorted (assumed, as WeChat does) and joined. */
export function eventSignature(token: string, timestamp: string, nonce: string, encrypt: string, algorithm: SignatureAlgorithm = 'sha1'): string {
  const joined = [token, timestamp, nonce, encrypt].sort().join('');
  return createHash(algorithm).update(joined, 'utf8').digest('hex');
}

/** Constant-time comparison of a received signature (hex, any case) with the expected one. */
export function signatureMatches(received: string, expected: string): boolean {
  const a = Buffer.from(received.toLowerCase(), 'utf8');
  const b = Buffer.from(expected, 'utf8');
  return a.length === b.length && timingSafeEqual(a, b);
}
