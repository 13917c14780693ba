/*
 * The raw ESAPI anchor for the TPM sign benchmark: an ECDSA P-256 key under an ECC SRK, loaded
 * once, then Esys_Sign in a tight loop for a fixed time, with either the password session or a
 * salted HMAC session with AES-128-CFB parameter encryption (decrypt|encrypt), as seal-bridge
 * uses. Prints one JSON line: {"mode":…,"ops":…,"seconds":…}.
 *
 *   esapi-sign <tcti> <password|encrypted> <seconds>
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_tctildr.h>

#define CHECK(rc, what)                                                     \
  do {                                                                      \
    if ((rc) != TSS2_RC_SUCCESS) {                                          \
      fprintf(stderr, "%s failed: 0x%x\n", (what), (unsigned)(rc));         \
      exit(1);                                                              \
    }                                                                       \
  } while (0)

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: esapi-sign <tcti> <password|encrypted> <seconds>\n");
    return 2;
  }
  const int encrypted = strcmp(argv[2], "encrypted") == 0;
  const double seconds = atof(argv[3]);
  TSS2_TCTI_CONTEXT *tcti = NULL;
  ESYS_CONTEXT *esys = NULL;
  CHECK(Tss2_TctiLdr_Initialize(argv[1], &tcti), "tcti");
  CHECK(Esys_Initialize(&esys, tcti, NULL), "Esys_Initialize");

  TPM2B_SENSITIVE_CREATE sens = {0};
  TPM2B_DATA outside = {0};
  TPML_PCR_SELECTION pcrs = {0};
  TPM2B_PUBLIC srkTemplate = {0};
  srkTemplate.publicArea.type = TPM2_ALG_ECC;
  srkTemplate.publicArea.nameAlg = TPM2_ALG_SHA256;
  srkTemplate.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                            TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA | TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT;
  srkTemplate.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
  srkTemplate.publicArea.parameters.eccDetail.symmetric.keyBits.aes = 128;
  srkTemplate.publicArea.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  srkTemplate.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  srkTemplate.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  srkTemplate.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  srkTemplate.publicArea.unique.ecc.x.size = 32;
  srkTemplate.publicArea.unique.ecc.y.size = 32;
  ESYS_TR srk = ESYS_TR_NONE;
  CHECK(Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &srkTemplate, &outside, &pcrs,
                           &srk, NULL, NULL, NULL, NULL),
        "CreatePrimary");

  TPM2B_PUBLIC keyTemplate = {0};
  keyTemplate.publicArea.type = TPM2_ALG_ECC;
  keyTemplate.publicArea.nameAlg = TPM2_ALG_SHA256;
  keyTemplate.publicArea.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                            TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA | TPMA_OBJECT_SIGN_ENCRYPT;
  keyTemplate.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
  keyTemplate.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  keyTemplate.publicArea.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  keyTemplate.publicArea.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  TPM2B_PRIVATE *priv = NULL;
  TPM2B_PUBLIC *pub = NULL;
  CHECK(Esys_Create(esys, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &sens, &keyTemplate, &outside, &pcrs, &priv, &pub, NULL,
                    NULL, NULL),
        "Create");
  ESYS_TR key = ESYS_TR_NONE;
  CHECK(Esys_Load(esys, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, priv, pub, &key), "Load");

  ESYS_TR session = ESYS_TR_PASSWORD;
  if (encrypted) {
    TPMT_SYM_DEF sym = {.algorithm = TPM2_ALG_AES, .keyBits = {.aes = 128}, .mode = {.aes = TPM2_ALG_CFB}};
    CHECK(Esys_StartAuthSession(esys, srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, NULL, TPM2_SE_HMAC, &sym,
                                TPM2_ALG_SHA256, &session),
          "StartAuthSession");
    CHECK(Esys_TRSess_SetAttributes(esys, session, TPMA_SESSION_CONTINUESESSION | TPMA_SESSION_DECRYPT | TPMA_SESSION_ENCRYPT, 0xff),
          "SetAttributes");
  }

  TPM2B_DIGEST digest = {.size = 32};
  memset(digest.buffer, 0x5a, 32);
  TPMT_SIG_SCHEME scheme = {.scheme = TPM2_ALG_ECDSA, .details = {.ecdsa = {.hashAlg = TPM2_ALG_SHA256}}};
  TPMT_TK_HASHCHECK ticket = {.tag = TPM2_ST_HASHCHECK, .hierarchy = TPM2_RH_NULL};
  long ops = 0;
  const double start = now();
  double elapsed = 0;
  while (elapsed < seconds) {
    TPMT_SIGNATURE *sig = NULL;
    CHECK(Esys_Sign(esys, key, session, ESYS_TR_NONE, ESYS_TR_NONE, &digest, &scheme, &ticket, &sig), "Sign");
    Esys_Free(sig);
    ops++;
    elapsed = now() - start;
  }
  printf("{\"mode\":\"%s\",\"ops\":%ld,\"seconds\":%.6f}\n", argv[2], ops, elapsed);

  if (encrypted) Esys_FlushContext(esys, session);
  Esys_FlushContext(esys, key);
  Esys_FlushContext(esys, srk);
  Esys_Free(priv);
  Esys_Free(pub);
  Esys_Finalize(&esys);
  Tss2_TctiLdr_Finalize(&tcti);
  return 0;
}
