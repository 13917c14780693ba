/*
 * seal-fault-pkcs11: a PKCS#11 module for tests only. It loads the real module named by
 * SEAL_FAULT_TARGET, hands out its own CK_FUNCTION_LIST whose every entry forwards to the
 * target, and, as told by a small control file (SEAL_FAULT_CONTROL), fails chosen calls with
 * chosen CKR_* values, delays them, or holds them until released. Every call is counted per
 * function in a stats file (SEAL_FAULT_STATS) that the test reads.
 *
 * Control file, one rule per line ('#' starts a comment):
 *   <function|*> fail <rv> [count=N] [after=N]     return rv instead of calling the target
 *   <function|*> delay <ms> [count=N] [after=N]    sleep, then forward
 *   <function|*> hang [count=N] [after=N]          hold the call until the control file
 *                                                  changes, then forward
 * The first rule that names the function (or '*'), has let `after` matching calls pass and has
 * count left (default: no limit) acts on the call. The file is re-read on every call under one
 * mutex (pkcs11js calls from libuv worker threads too); when its content changes, the rules and
 * their counts start afresh and every held call is released. Writers replace the file with
 * rename(2), so a reader never sees half a file. A held call is released after
 * SEAL_FAULT_HANG_MAX_MS (default 60000) in any case, so a forgotten rule cannot wedge a run.
 *
 * Stats file, rewritten (via rename) when a call enters and when it leaves:
 *   generation <g> rules <n> errors <e>
 *   <function> calls=<n> failed=<n> delayed=<n> hung=<n> active=<n>
 * `generation` counts the control contents seen, `errors` the lines the proxy did not
 * understand, `active` the calls inside the proxy or the target right now.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <pkcs11/pkcs11.h> /* pkcs11js/includes: the PKCS#11 v2.40 headers */

#define EXPORT __attribute__((visibility("default")))

/* Every function of CK_FUNCTION_LIST but C_GetFunctionList: name, parameters, arguments
 * (from pkcs11f.h, in its order). */
#define FUNCTIONS(X) \
  X(C_Initialize, (CK_VOID_PTR pInitArgs), (pInitArgs)) \
  X(C_Finalize, (CK_VOID_PTR pReserved), (pReserved)) \
  X(C_GetInfo, (CK_INFO_PTR pInfo), (pInfo)) \
  X(C_GetSlotList, (CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount), (tokenPresent, pSlotList, pulCount)) \
  X(C_GetSlotInfo, (CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo), (slotID, pInfo)) \
  X(C_GetTokenInfo, (CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo), (slotID, pInfo)) \
  X(C_GetMechanismList, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, CK_ULONG_PTR pulCount), (slotID, pMechanismList, pulCount)) \
  X(C_GetMechanismInfo, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo), (slotID, type, pInfo)) \
  X(C_InitToken, (CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel), (slotID, pPin, ulPinLen, pLabel)) \
  X(C_InitPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen), (hSession, pPin, ulPinLen)) \
  X(C_SetPIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen, CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen), (hSession, pOldPin, ulOldLen, pNewPin, ulNewLen)) \
  X(C_OpenSession, (CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession), (slotID, flags, pApplication, Notify, phSession)) \
  X(C_CloseSession, (CK_SESSION_HANDLE hSession), (hSession)) \
  X(C_CloseAllSessions, (CK_SLOT_ID slotID), (slotID)) \
  X(C_GetSessionInfo, (CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo), (hSession, pInfo)) \
  X(C_GetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG_PTR pulOperationStateLen), (hSession, pOperationState, pulOperationStateLen)) \
  X(C_SetOperationState, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey, CK_OBJECT_HANDLE hAuthenticationKey), (hSession, pOperationState, ulOperationStateLen, hEncryptionKey, hAuthenticationKey)) \
  X(C_Login, (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen), (hSession, userType, pPin, ulPinLen)) \
  X(C_Logout, (CK_SESSION_HANDLE hSession), (hSession)) \
  X(C_CreateObject, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject), (hSession, pTemplate, ulCount, phObject)) \
  X(C_CopyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phNewObject), (hSession, hObject, pTemplate, ulCount, phNewObject)) \
  X(C_DestroyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject), (hSession, hObject)) \
  X(C_GetObjectSize, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG_PTR pulSize), (hSession, hObject, pulSize)) \
  X(C_GetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount), (hSession, hObject, pTemplate, ulCount)) \
  X(C_SetAttributeValue, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount), (hSession, hObject, pTemplate, ulCount)) \
  X(C_FindObjectsInit, (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount), (hSession, pTemplate, ulCount)) \
  X(C_FindObjects, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount), (hSession, phObject, ulMaxObjectCount, pulObjectCount)) \
  X(C_FindObjectsFinal, (CK_SESSION_HANDLE hSession), (hSession)) \
  X(C_EncryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_Encrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen), (hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen)) \
  X(C_EncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)) \
  X(C_EncryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart, CK_ULONG_PTR pulLastEncryptedPartLen), (hSession, pLastEncryptedPart, pulLastEncryptedPartLen)) \
  X(C_DecryptInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_Decrypt, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen), (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen)) \
  X(C_DecryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)) \
  X(C_DecryptFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, CK_ULONG_PTR pulLastPartLen), (hSession, pLastPart, pulLastPartLen)) \
  X(C_DigestInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism), (hSession, pMechanism)) \
  X(C_Digest, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen), (hSession, pData, ulDataLen, pDigest, pulDigestLen)) \
  X(C_DigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), (hSession, pPart, ulPartLen)) \
  X(C_DigestKey, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey), (hSession, hKey)) \
  X(C_DigestFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen), (hSession, pDigest, pulDigestLen)) \
  X(C_SignInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_Sign, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen), (hSession, pData, ulDataLen, pSignature, pulSignatureLen)) \
  X(C_SignUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), (hSession, pPart, ulPartLen)) \
  X(C_SignFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen), (hSession, pSignature, pulSignatureLen)) \
  X(C_SignRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_SignRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen), (hSession, pData, ulDataLen, pSignature, pulSignatureLen)) \
  X(C_VerifyInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_Verify, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen), (hSession, pData, ulDataLen, pSignature, ulSignatureLen)) \
  X(C_VerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen), (hSession, pPart, ulPartLen)) \
  X(C_VerifyFinal, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen), (hSession, pSignature, ulSignatureLen)) \
  X(C_VerifyRecoverInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey), (hSession, pMechanism, hKey)) \
  X(C_VerifyRecover, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen), (hSession, pSignature, ulSignatureLen, pData, pulDataLen)) \
  X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)) \
  X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)) \
  X(C_SignEncryptUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen, CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen), (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen)) \
  X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen), (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen)) \
  X(C_GenerateKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey), (hSession, pMechanism, pTemplate, ulCount, phKey)) \
  X(C_GenerateKeyPair, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount, CK_ATTRIBUTE_PTR pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount, CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey), (hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount, pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey)) \
  X(C_WrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen), (hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen)) \
  X(C_UnwrapKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey, CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey), (hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen, pTemplate, ulAttributeCount, phKey)) \
  X(C_DeriveKey, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey), (hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey)) \
  X(C_SeedRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen), (hSession, pSeed, ulSeedLen)) \
  X(C_GenerateRandom, (CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen), (hSession, RandomData, ulRandomLen)) \
  X(C_GetFunctionStatus, (CK_SESSION_HANDLE hSession), (hSession)) \
  X(C_CancelFunction, (CK_SESSION_HANDLE hSession), (hSession)) \
  X(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pRserved), (flags, pSlot, pRserved))

enum fn_id {
#define X(name, params, args) FN_##name,
  FUNCTIONS(X)
#undef X
  FN_COUNT
};

static const char *const fn_names[FN_COUNT] = {
#define X(name, params, args) #name,
  FUNCTIONS(X)
#undef X
};

enum action { ACT_FAIL, ACT_DELAY, ACT_HANG };

struct rule {
  int fn; /* an fn_id, or -1 for every function */
  enum action action;
  CK_RV rv;
  unsigned long ms;
  long remaining; /* -1: no limit */
  unsigned long after;
  unsigned long seen;
};

struct counters {
  unsigned long calls, failed, delayed, hung, active;
};

#define MAX_RULES 64
#define MAX_CONTROL 16384
#define HANG_POLL_MS 5

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR target;
static char control_path[4096];
static char stats_path[4096];
static unsigned long hang_max_ms = 60000;

/* guarded by lock */
static char control_text[MAX_CONTROL];
static size_t control_len;
static int control_seen;
static unsigned long generation;
static struct rule rules[MAX_RULES];
static size_t nrules;
static unsigned long parse_errors;
static struct counters counters[FN_COUNT];

static void sleep_ms(unsigned long ms) {
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static unsigned long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long)ts.tv_sec * 1000UL + (unsigned long)ts.tv_nsec / 1000000UL;
}

static int lookup_function(const char *name) {
  if (strcmp(name, "*") == 0) return -1;
  for (int i = 0; i < FN_COUNT; i++) {
    if (strcmp(fn_names[i], name) == 0) return i;
  }
  return -2;
}

static int parse_number(const char *s, unsigned long *out) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 0);
  if (errno != 0 || end == s || *end != '\0' || s[0] == '-') return -1;
  *out = v;
  return 0;
}

/* One rule from one line; returns 1 for a rule, 0 for a blank line, -1 for nonsense. */
static int parse_line(char *line, struct rule *r) {
  char *hash = strchr(line, '#');
  if (hash) *hash = '\0';
  char *save = NULL;
  char *fn = strtok_r(line, " \t\r", &save);
  if (!fn) return 0;
  char *action = strtok_r(NULL, " \t\r", &save);
  if (!action) return -1;
  memset(r, 0, sizeof *r);
  r->remaining = -1;
  r->fn = lookup_function(fn);
  if (r->fn == -2) return -1;
  unsigned long v;
  if (strcmp(action, "fail") == 0) {
    char *rv = strtok_r(NULL, " \t\r", &save);
    if (!rv || parse_number(rv, &v) != 0) return -1;
    r->action = ACT_FAIL;
    r->rv = (CK_RV)v;
  } else if (strcmp(action, "delay") == 0) {
    char *ms = strtok_r(NULL, " \t\r", &save);
    if (!ms || parse_number(ms, &v) != 0) return -1;
    r->action = ACT_DELAY;
    r->ms = v;
  } else if (strcmp(action, "hang") == 0) {
    r->action = ACT_HANG;
  } else {
    return -1;
  }
  for (char *opt; (opt = strtok_r(NULL, " \t\r", &save)) != NULL;) {
    if (strncmp(opt, "count=", 6) == 0 && parse_number(opt + 6, &v) == 0 && v <= 1000000000UL) {
      r->remaining = (long)v;
    } else if (strncmp(opt, "after=", 6) == 0 && parse_number(opt + 6, &v) == 0) {
      r->after = v;
    } else {
      return -1;
    }
  }
  return 1;
}

/* Lock held. */
static void parse_rules(void) {
  char text[MAX_CONTROL + 1];
  memcpy(text, control_text, control_len);
  text[control_len] = '\0';
  nrules = 0;
  parse_errors = 0;
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    struct rule r;
    int got = parse_line(line, &r);
    if (got < 0 || (got > 0 && nrules == MAX_RULES)) parse_errors++;
    else if (got > 0) rules[nrules++] = r;
  }
}

/* Lock held: picks up a new control file. */
static void reload_control(void) {
  char buf[MAX_CONTROL];
  size_t len = 0;
  if (control_path[0]) {
    int fd = open(control_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ssize_t n;
      while (len < sizeof buf && (n = read(fd, buf + len, sizeof buf - len)) > 0) len += (size_t)n;
      close(fd);
    }
  }
  if (control_seen && len == control_len && memcmp(buf, control_text, len) == 0) return;
  memcpy(control_text, buf, len);
  control_len = len;
  control_seen = 1;
  generation++;
  parse_rules();
  if (len == sizeof buf) parse_errors++; /* possibly cut short */
}

/* Lock held. */
static void write_stats(void) {
  if (!stats_path[0]) return;
  char tmp[sizeof stats_path + 8];
  snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
  FILE *f = fopen(tmp, "we");
  if (!f) return;
  fprintf(f, "generation %lu rules %zu errors %lu\n", generation, nrules, parse_errors);
  for (int i = 0; i < FN_COUNT; i++) {
    const struct counters *c = &counters[i];
    if (c->calls == 0) continue;
    fprintf(f, "%s calls=%lu failed=%lu delayed=%lu hung=%lu active=%lu\n", fn_names[i], c->calls, c->failed, c->delayed, c->hung, c->active);
  }
  if (fclose(f) == 0) rename(tmp, stats_path);
}

/* Applies the control file to one call. Returns 1 with *rv set when the call must not reach the
 * target, 0 when it must be forwarded (after any delay or hold). */
static int before_call(enum fn_id fn, CK_RV *rv) {
  pthread_mutex_lock(&lock);
  reload_control();
  struct counters *c = &counters[fn];
  c->calls++;
  c->active++;
  struct rule *hit = NULL;
  for (size_t i = 0; i < nrules; i++) {
    struct rule *r = &rules[i];
    if (r->fn != -1 && r->fn != (int)fn) continue;
    if (r->remaining == 0) continue;
    if (++r->seen <= r->after) continue;
    if (r->remaining > 0) r->remaining--;
    hit = r;
    break;
  }
  if (!hit) {
    write_stats();
    pthread_mutex_unlock(&lock);
    return 0;
  }
  switch (hit->action) {
  case ACT_FAIL:
    c->failed++;
    c->active--;
    *rv = hit->rv;
    write_stats();
    pthread_mutex_unlock(&lock);
    return 1;
  case ACT_DELAY: {
    unsigned long ms = hit->ms;
    c->delayed++;
    write_stats();
    pthread_mutex_unlock(&lock);
    sleep_ms(ms);
    return 0;
  }
  case ACT_HANG: {
    unsigned long held_under = generation;
    unsigned long since = now_ms();
    c->hung++;
    write_stats();
    while (generation == held_under && now_ms() - since < hang_max_ms) {
      pthread_mutex_unlock(&lock);
      sleep_ms(HANG_POLL_MS);
      pthread_mutex_lock(&lock);
      reload_control();
    }
    pthread_mutex_unlock(&lock);
    return 0;
  }
  }
  pthread_mutex_unlock(&lock);
  return 0;
}

static void after_call(enum fn_id fn) {
  pthread_mutex_lock(&lock);
  counters[fn].active--;
  write_stats();
  pthread_mutex_unlock(&lock);
}

#define X(name, params, args)                   \
  static CK_RV proxy_##name params {            \
    CK_RV rv;                                   \
    if (before_call(FN_##name, &rv)) return rv; \
    rv = target->name args;                     \
    after_call(FN_##name);                      \
    return rv;                                  \
  }
FUNCTIONS(X)
#undef X

static CK_FUNCTION_LIST proxy_list = {
    .version = {2, 40},
#define X(name, params, args) .name = proxy_##name,
    FUNCTIONS(X)
#undef X
    .C_GetFunctionList = C_GetFunctionList,
};

static void copy_env(const char *name, char *out, size_t size) {
  const char *v = getenv(name);
  if (v && strlen(v) < size) strcpy(out, v);
  else if (v) fprintf(stderr, "seal-fault-pkcs11: %s is too long, ignored\n", name);
}

static void load_target(void) {
  const char *path = getenv("SEAL_FAULT_TARGET");
  if (!path || !*path) {
    fprintf(stderr, "seal-fault-pkcs11: SEAL_FAULT_TARGET is not set\n");
    return;
  }
  copy_env("SEAL_FAULT_CONTROL", control_path, sizeof control_path);
  copy_env("SEAL_FAULT_STATS", stats_path, sizeof stats_path);
  const char *hang = getenv("SEAL_FAULT_HANG_MAX_MS");
  unsigned long v;
  if (hang && parse_number(hang, &v) == 0) hang_max_ms = v;
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "seal-fault-pkcs11: cannot load %s: %s\n", path, dlerror());
    return;
  }
  CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
  CK_FUNCTION_LIST_PTR list = NULL;
  if (!get || get(&list) != CKR_OK || !list || list == &proxy_list) {
    fprintf(stderr, "seal-fault-pkcs11: %s has no usable C_GetFunctionList\n", path);
    return; /* the library stays loaded: it may have run constructors */
  }
  proxy_list.version = list->version;
  target = list;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
  if (!ppFunctionList) return CKR_ARGUMENTS_BAD;
  pthread_once(&load_once, load_target);
  if (!target) return CKR_GENERAL_ERROR;
  *ppFunctionList = &proxy_list;
  return CKR_OK;
}
