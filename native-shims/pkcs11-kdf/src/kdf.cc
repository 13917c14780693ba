// pkcs11_kdf: C_DeriveKey for KDF mechanisms whose parameter structures hold
// pointers, which pkcs11js 2.x cannot marshal. It runs on the module instance
// pkcs11js already loaded (dlopen of the same path returns that instance) and
// on the raw handles pkcs11js hands out: Buffers holding a native CK_ULONG
// (pkcs11js src/pkcs11.cpp get_args_handle: length must be sizeof(CK_ULONG),
// read with *(CK_OBJECT_HANDLE *)data, i.e. host byte order).
#include <dlfcn.h>
#include <string.h>

#include <cstdio>
#include <string>
#include <vector>

#include <napi.h>
#include <pkcs11/pkcs11.h>  // pkcs11js/includes: PKCS#11 v2.40 headers

// The v2.40 headers lack the v3.0 KDF types, so they are defined here exactly
// as in OASIS "PKCS #11 Cryptographic Token Interface Current Mechanisms
// Specification Version 3.0" (pkcs11-curr-v3.0): section "HKDF Mechanisms"
// (CK_HKDF_PARAMS) and section "SP 800-108 Key Derivation", Mechanism
// Parameters (2.42.2 in csprd01). Numeric values are those of the v3.0
// pkcs11t.h (the DKM_LENGTH_SUM_OF_* values are the ones the v3.0 header and
// NSS use; the prose spec leaves them unnumbered).
#ifndef CKF_HKDF_SALT_NULL
#define CKM_HKDF_DERIVE 0x0000402aUL
#define CKF_HKDF_SALT_NULL 0x00000001UL
#define CKF_HKDF_SALT_DATA 0x00000002UL
typedef struct CK_HKDF_PARAMS {
  CK_BBOOL bExtract;
  CK_BBOOL bExpand;
  CK_MECHANISM_TYPE prfHashMechanism;
  CK_ULONG ulSaltType;
  CK_BYTE_PTR pSalt;
  CK_ULONG ulSaltLen;
  CK_OBJECT_HANDLE hSaltKey;
  CK_BYTE_PTR pInfo;
  CK_ULONG ulInfoLen;
} CK_HKDF_PARAMS;
#endif
#ifndef CK_SP800_108_ITERATION_VARIABLE
#define CKM_SP800_108_COUNTER_KDF 0x000003acUL
#define CK_SP800_108_ITERATION_VARIABLE 0x00000001UL
#define CK_SP800_108_DKM_LENGTH 0x00000003UL
#define CK_SP800_108_BYTE_ARRAY 0x00000004UL
#define CK_SP800_108_DKM_LENGTH_SUM_OF_KEYS 0x00000001UL
typedef struct CK_PRF_DATA_PARAM {
  CK_ULONG type;  // CK_PRF_DATA_TYPE
  CK_VOID_PTR pValue;
  CK_ULONG ulValueLen;
} CK_PRF_DATA_PARAM;
typedef struct CK_SP800_108_COUNTER_FORMAT {
  CK_BBOOL bLittleEndian;
  CK_ULONG ulWidthInBits;
} CK_SP800_108_COUNTER_FORMAT;
typedef struct CK_SP800_108_DKM_LENGTH_FORMAT {
  CK_ULONG dkmLengthMethod;  // CK_SP800_108_DKM_LENGTH_METHOD
  CK_BBOOL bLittleEndian;
  CK_ULONG ulWidthInBits;
} CK_SP800_108_DKM_LENGTH_FORMAT;
typedef struct CK_DERIVED_KEY {
  CK_ATTRIBUTE_PTR pTemplate;
  CK_ULONG ulAttributeCount;
  CK_OBJECT_HANDLE_PTR phKey;
} CK_DERIVED_KEY;
typedef struct CK_SP800_108_KDF_PARAMS {
  CK_MECHANISM_TYPE prfType;  // CK_SP800_108_PRF_TYPE
  CK_ULONG ulNumberOfDataParams;
  CK_PRF_DATA_PARAM *pDataParams;
  CK_ULONG ulAdditionalDerivedKeys;
  CK_DERIVED_KEY *pAdditionalDerivedKeys;
} CK_SP800_108_KDF_PARAMS;
#endif

namespace {

using Bytes = std::vector<CK_BYTE>;
enum class Kind { Hkdf, Sp800Counter, EcbEncryptData };

struct Request {
  std::string path;
  CK_SESSION_HANDLE session = 0;
  CK_OBJECT_HANDLE baseKey = 0;
  Kind kind = Kind::Hkdf;
  CK_ULONG prf = 0, counterBits = 0, dkmBits = 0;
  bool extract = false, expand = false, hasSalt = false, hasDkm = false;
  Bytes salt, info, label, context, data;
  std::vector<CK_ULONG> attrTypes;
  std::vector<Bytes> attrValues;
};

bool Fail(Napi::Env env, const std::string &msg) {
  // A getter or Proxy trap that threw left its exception pending: report that one (a second
  // napi_throw on top of it is a fatal error that aborts the process).
  if (!env.IsExceptionPending()) Napi::TypeError::New(env, "pkcs11_kdf.deriveKey: " + msg).ThrowAsJavaScriptException();
  return false;
}
bool GetULong(Napi::Env env, Napi::Value v, const char *name, CK_ULONG *out) {
  if (!v.IsNumber()) return Fail(env, std::string(name) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d)))
    return Fail(env, std::string(name) + " must be a non-negative safe integer");
  *out = static_cast<CK_ULONG>(d);
  return true;
}
bool GetBytes(Napi::Env env, Napi::Value v, const char *name, Bytes *out) {
  if (!v.IsBuffer()) return Fail(env, std::string(name) + " must be a Buffer");
  auto b = v.As<Napi::Buffer<CK_BYTE>>();
  out->assign(b.Data(), b.Data() + b.Length());
  return true;
}
bool GetOptBytes(Napi::Env env, Napi::Object o, const char *name, Bytes *out, bool *present) {
  Napi::Value v = o.Get(name);
  *present = !v.IsUndefined();
  return !*present || GetBytes(env, v, name, out);
}
bool GetHandle(Napi::Env env, Napi::Value v, const char *name, CK_ULONG *out) {
  if (!v.IsBuffer() || v.As<Napi::Buffer<CK_BYTE>>().Length() != sizeof(CK_ULONG))
    return Fail(env, std::string(name) + " must be a " + std::to_string(sizeof(CK_ULONG)) +
                         "-byte handle Buffer (as returned by pkcs11js)");
  memcpy(out, v.As<Napi::Buffer<CK_BYTE>>().Data(), sizeof(CK_ULONG));  // host byte order
  return true;
}
bool GetBool(Napi::Env env, Napi::Object o, const char *name, bool *out) {
  Napi::Value v = o.Get(name);
  if (!v.IsBoolean()) return Fail(env, std::string("mech.") + name + " must be a boolean");
  *out = v.As<Napi::Boolean>().Value();
  return true;
}

bool ParseMechanism(Napi::Env env, Napi::Value v, Request *r) {
  if (!v.IsObject() || v.IsArray()) return Fail(env, "mech must be an object");
  Napi::Object m = v.As<Napi::Object>();
  Napi::Value kv = m.Get("kind");
  std::string kind = kv.IsString() ? kv.As<Napi::String>().Utf8Value() : "";
  bool present = false;
  if (kind == "hkdf") {
    r->kind = Kind::Hkdf;
    return GetULong(env, m.Get("prf"), "mech.prf", &r->prf) && GetBool(env, m, "extract", &r->extract) &&
           GetBool(env, m, "expand", &r->expand) && GetOptBytes(env, m, "salt", &r->salt, &r->hasSalt) &&
           GetOptBytes(env, m, "info", &r->info, &present);
  }
  if (kind == "sp800-108-counter") {
    r->kind = Kind::Sp800Counter;
    if (!GetULong(env, m.Get("prf"), "mech.prf", &r->prf) ||
        !GetULong(env, m.Get("counterBits"), "mech.counterBits", &r->counterBits) ||
        !GetOptBytes(env, m, "label", &r->label, &present) || !GetOptBytes(env, m, "context", &r->context, &present))
      return false;
    if (r->counterBits < 1 || r->counterBits > 64) return Fail(env, "mech.counterBits must be in 1..64");
    Napi::Value dkm = m.Get("dkmLengthBits");
    r->hasDkm = !dkm.IsUndefined();
    if (r->hasDkm && !GetULong(env, dkm, "mech.dkmLengthBits", &r->dkmBits)) return false;
    if (r->hasDkm && (r->dkmBits < 1 || r->dkmBits > 64)) return Fail(env, "mech.dkmLengthBits must be in 1..64");
    return true;
  }
  if (kind == "ecb-encrypt-data") {
    r->kind = Kind::EcbEncryptData;
    return GetBytes(env, m.Get("data"), "mech.data", &r->data);
  }
  return Fail(env, "mech.kind must be 'hkdf', 'sp800-108-counter' or 'ecb-encrypt-data'");
}

bool ParseTemplate(Napi::Env env, Napi::Value v, Request *r) {
  if (!v.IsArray()) return Fail(env, "template must be an array");
  Napi::Array a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value e = a.Get(i);
    if (!e.IsObject()) return Fail(env, "template[" + std::to_string(i) + "] must be an object");
    CK_ULONG type = 0;
    r->attrValues.emplace_back();
    if (!GetULong(env, e.As<Napi::Object>().Get("type"), "template[].type", &type) ||
        !GetBytes(env, e.As<Napi::Object>().Get("value"), "template[].value", &r->attrValues.back()))
      return false;
    r->attrTypes.push_back(type);
  }
  return true;
}

class DeriveWorker : public Napi::AsyncWorker {
 public:
  DeriveWorker(Napi::Env env, Request &&r)
      : Napi::AsyncWorker(env, "pkcs11_kdf.deriveKey"), deferred_(Napi::Promise::Deferred::New(env)), r_(std::move(r)) {}
  ~DeriveWorker() override {  // secret-ish inputs (ECB data, template values)
    for (Bytes *b : {&r_.salt, &r_.info, &r_.label, &r_.context, &r_.data}) Wipe(*b);
    for (Bytes &b : r_.attrValues) Wipe(b);
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  static void Wipe(Bytes &b) {
    if (!b.empty()) explicit_bzero(b.data(), b.size());
  }

 protected:
  void Execute() override {
    // RTLD_NOLOAD: only succeeds if the module is already mapped, and then
    // returns that very instance (the one pkcs11js initialised). Fallback
    // RTLD_NOW maps it afresh; such an instance is not C_Initialize'd and the
    // module itself answers CKR_CRYPTOKI_NOT_INITIALIZED.
    void *lib = dlopen(r_.path.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen(r_.path.c_str(), RTLD_NOW);
    if (lib == nullptr) {
      const char *why = dlerror();
      return Fail("dlopen", CKR_OK, std::string("dlopen failed: ") + (why ? why : r_.path));
    }
    auto getList = reinterpret_cast<CK_C_GetFunctionList>(dlsym(lib, "C_GetFunctionList"));
    CK_FUNCTION_LIST_PTR fl = nullptr;
    CK_RV rv = getList ? getList(&fl) : CKR_FUNCTION_FAILED;
    if (rv == CKR_OK && fl != nullptr && fl->C_DeriveKey != nullptr) rv = Derive(fl);
    else Fail("C_GetFunctionList", rv, "C_GetFunctionList failed or module has no C_DeriveKey");
    dlclose(lib);  // drops only our reference; pkcs11js keeps its own
    if (!failed_ && rv != CKR_OK) {
      char msg[64];  // CKR names: map .code with ckrName() in src/backends/pkcs11/errors.ts
      snprintf(msg, sizeof msg, "C_DeriveKey failed: CKR 0x%08lx (%lu)", rv, rv);
      Fail("C_DeriveKey", rv, msg);
    }
  }

  void OnOK() override {
    deferred_.Resolve(Napi::Buffer<CK_BYTE>::Copy(Env(), reinterpret_cast<CK_BYTE *>(&hKey_), sizeof hKey_));
  }
  void OnError(const Napi::Error &e) override {
    Napi::Object err = e.Value();
    if (rv_ != CKR_OK) err.Set("code", Napi::Number::New(Env(), static_cast<double>(rv_)));
    err.Set("method", Napi::String::New(Env(), method_));
    deferred_.Reject(err);
  }

 private:
  void Fail(const char *method, CK_RV rv, const std::string &msg) {
    failed_ = true;
    method_ = method;
    rv_ = rv;
    SetError(msg);
  }

  CK_RV Derive(CK_FUNCTION_LIST_PTR fl) {
    std::vector<CK_ATTRIBUTE> tmpl(r_.attrTypes.size());
    for (size_t i = 0; i < tmpl.size(); i++) {
      Bytes &v = r_.attrValues[i];
      tmpl[i] = {r_.attrTypes[i], v.empty() ? nullptr : v.data(), static_cast<CK_ULONG>(v.size())};
    }
    CK_MECHANISM mech = {0, nullptr, 0};
    CK_HKDF_PARAMS hkdf;
    CK_SP800_108_KDF_PARAMS kbkdf;
    CK_KEY_DERIVATION_STRING_DATA ecb;
    // SP 800-108 counter-mode PRF input, one CK_PRF_DATA_PARAM per field, in order:
    //   [i]_counterBits (ITERATION_VARIABLE, big-endian) || Label (BYTE_ARRAY,
    //   omitted if empty) || 0x00 (BYTE_ARRAY of one zero byte) || Context
    //   (BYTE_ARRAY, omitted if empty) || [L]_dkmLengthBits (DKM_LENGTH,
    //   big-endian, SUM_OF_KEYS: L = derived key length in bits; optional).
    // With counterBits = dkmLengthBits = 32 this is TPM 2.0 KDFa:
    //   K(i) = HMAC(key, [i]_32 || Label || 0x00 || Context || [L]_32), i = 1, 2, ...
    CK_SP800_108_COUNTER_FORMAT counter = {CK_FALSE, r_.counterBits};
    CK_SP800_108_DKM_LENGTH_FORMAT dkm = {CK_SP800_108_DKM_LENGTH_SUM_OF_KEYS, CK_FALSE, r_.dkmBits};
    CK_BYTE separator = 0x00;
    std::vector<CK_PRF_DATA_PARAM> dp;
    switch (r_.kind) {
      case Kind::Hkdf:
        hkdf = {static_cast<CK_BBOOL>(r_.extract ? CK_TRUE : CK_FALSE), static_cast<CK_BBOOL>(r_.expand ? CK_TRUE : CK_FALSE), r_.prf,
                r_.hasSalt ? CKF_HKDF_SALT_DATA : CKF_HKDF_SALT_NULL,
                r_.hasSalt && !r_.salt.empty() ? r_.salt.data() : nullptr, static_cast<CK_ULONG>(r_.salt.size()),
                CK_INVALID_HANDLE, r_.info.empty() ? nullptr : r_.info.data(), static_cast<CK_ULONG>(r_.info.size())};
        mech = {CKM_HKDF_DERIVE, &hkdf, sizeof hkdf};
        break;
      case Kind::Sp800Counter:
        dp.push_back({CK_SP800_108_ITERATION_VARIABLE, &counter, sizeof counter});
        if (!r_.label.empty()) dp.push_back({CK_SP800_108_BYTE_ARRAY, r_.label.data(), r_.label.size()});
        dp.push_back({CK_SP800_108_BYTE_ARRAY, &separator, 1});
        if (!r_.context.empty()) dp.push_back({CK_SP800_108_BYTE_ARRAY, r_.context.data(), r_.context.size()});
        if (r_.hasDkm) dp.push_back({CK_SP800_108_DKM_LENGTH, &dkm, sizeof dkm});
        kbkdf = {r_.prf, static_cast<CK_ULONG>(dp.size()), dp.data(), 0, nullptr};
        mech = {CKM_SP800_108_COUNTER_KDF, &kbkdf, sizeof kbkdf};
        break;
      case Kind::EcbEncryptData:
        ecb = {r_.data.empty() ? nullptr : r_.data.data(), static_cast<CK_ULONG>(r_.data.size())};
        mech = {CKM_AES_ECB_ENCRYPT_DATA, &ecb, sizeof ecb};
        break;
    }
    return fl->C_DeriveKey(r_.session, &mech, r_.baseKey, tmpl.empty() ? nullptr : tmpl.data(),
                           static_cast<CK_ULONG>(tmpl.size()), &hKey_);
  }

  Napi::Promise::Deferred deferred_;
  Request r_;
  CK_OBJECT_HANDLE hKey_ = CK_INVALID_HANDLE;
  CK_RV rv_ = CKR_OK;
  std::string method_;
  bool failed_ = false;
};

// deriveKey(modulePath, session, baseKey, mech, template) => Promise<Buffer>
Napi::Value DeriveKey(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  Request r;
  if (info.Length() != 5) return Fail(env, "expected 5 arguments"), env.Undefined();
  if (!info[0].IsString() || info[0].As<Napi::String>().Utf8Value().empty())
    return Fail(env, "modulePath must be a non-empty string"), env.Undefined();
  r.path = info[0].As<Napi::String>().Utf8Value();
  if (r.path.find('\0') != std::string::npos) return Fail(env, "modulePath contains NUL"), env.Undefined();
  if (!GetHandle(env, info[1], "session", &r.session) || !GetHandle(env, info[2], "baseKey", &r.baseKey) ||
      !ParseMechanism(env, info[3], &r) || !ParseTemplate(env, info[4], &r))
    return env.Undefined();
  auto *worker = new DeriveWorker(env, std::move(r));
  Napi::Promise p = worker->Promise();
  worker->Queue();  // owned and deleted by node-addon-api after OnOK/OnError
  return p;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("deriveKey", Napi::Function::New(env, DeriveKey, "deriveKey"));
  exports.Set("ulongSize", Napi::Number::New(env, sizeof(CK_ULONG)));
  return exports;
}

}  // namespace

NODE_API_MODULE(pkcs11_kdf, Init)
