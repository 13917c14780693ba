// tpm2_esys: a thin N-API binding over tpm2-tss ESAPI (libtss2-esys + libtss2-tctildr).
//
// One Context = one ESYS_CONTEXT owned by one worker thread with a FIFO queue: every call
// marshals its arguments on the JS thread (TPM structures arrive as their TPM wire encoding and
// are unmarshalled with libtss2-mu), runs the Esys_* function on the worker, and resolves a
// Promise with the outputs marshalled back to wire bytes. No TPM logic lives here: templates,
// policies, key stores and parsing are TypeScript (src/backends/tpm2/).
//
// A failing Esys call rejects with an Error whose `rc` property is the TSS2_RC and whose message
// is Tss2_RC_Decode's text (never an argument value).
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <napi.h>

namespace {

using Bytes = std::vector<uint8_t>;

constexpr std::chrono::microseconds kSpin{300};

struct Out {
  std::map<std::string, Bytes> bytes;
  std::map<std::string, double> numbers;
};

struct Job {
  std::function<TSS2_RC(ESYS_CONTEXT *, Out &)> run;
  Napi::Promise::Deferred deferred;
  Out out;
  TSS2_RC rc = TSS2_RC_SUCCESS;
  std::string failure;  // non-TSS failure (e.g. TCTI could not load)
  bool last = false;    // the finalize job: the worker stops after it
  bool needsContext = true;  // false for open/close, which run without an ESYS context
  explicit Job(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

// Wipes and frees an Esys output that may hold secrets (unsealed data, decrypted text).
template <typename T>
void freeWiped(T *p) {
  if (p == nullptr) return;
  volatile uint8_t *v = reinterpret_cast<volatile uint8_t *>(p);
  for (size_t i = 0; i < sizeof(T); i++) v[i] = 0;
  Esys_Free(p);
}

template <typename T>
Bytes marshal(const T *src, TSS2_RC (*fn)(T const *, uint8_t[], size_t, size_t *)) {
  Bytes b(sizeof(T) + 16);
  size_t off = 0;
  if (src == nullptr || fn(src, b.data(), b.size(), &off) != TSS2_RC_SUCCESS) return Bytes();
  b.resize(off);
  return b;
}

// Arguments read in order from a JS call; TPM structures come as wire-encoded Buffers.
class Args {
 public:
  explicit Args(const Napi::CallbackInfo &info) : info_(info) {}

  uint32_t u32() {
    Napi::Value v = next();
    if (!v.IsNumber()) throw Napi::TypeError::New(info_.Env(), "argument " + std::to_string(i_) + ": number expected");
    return v.As<Napi::Number>().Uint32Value();
  }

  Bytes bytes() {
    Napi::Value v = next();
    if (!v.IsBuffer()) throw Napi::TypeError::New(info_.Env(), "argument " + std::to_string(i_) + ": Buffer expected");
    auto b = v.As<Napi::Buffer<uint8_t>>();
    return Bytes(b.Data(), b.Data() + b.Length());
  }

  // A wire-encoded TPM structure; the whole Buffer must be consumed.
  template <typename T>
  std::shared_ptr<T> mu(TSS2_RC (*fn)(uint8_t const[], size_t, size_t *, T *)) {
    Bytes b = bytes();
    auto out = std::make_shared<T>();
    std::memset(out.get(), 0, sizeof(T));
    size_t off = 0;
    if (fn(b.data(), b.size(), &off, out.get()) != TSS2_RC_SUCCESS || off != b.size())
      throw Napi::TypeError::New(info_.Env(), "argument " + std::to_string(i_) + ": malformed TPM structure");
    std::fill(b.begin(), b.end(), 0);
    return out;
  }

  // A TPM2B of the given type filled from raw bytes (size checked).
  template <typename T>
  std::shared_ptr<T> tpm2b() {
    Bytes b = bytes();
    auto out = std::make_shared<T>();
    std::memset(out.get(), 0, sizeof(T));
    if (b.size() > sizeof(out->buffer))
      throw Napi::RangeError::New(info_.Env(), "argument " + std::to_string(i_) + ": too long for its TPM2B");
    out->size = static_cast<UINT16>(b.size());
    std::memcpy(out->buffer, b.data(), b.size());
    std::fill(b.begin(), b.end(), 0);
    return out;
  }

  struct Sessions {
    ESYS_TR s1, s2, s3;
  };
  // An array of up to three session handles (missing entries are ESYS_TR_NONE).
  Sessions sessions() {
    Sessions s{ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE};
    if (i_ >= info_.Length()) return s;  // trailing sessions may be left out
    Napi::Value v = next();
    if (v.IsUndefined() || v.IsNull()) return s;
    if (!v.IsArray()) throw Napi::TypeError::New(info_.Env(), "sessions: array expected");
    auto a = v.As<Napi::Array>();
    ESYS_TR *dst[3] = {&s.s1, &s.s2, &s.s3};
    for (uint32_t k = 0; k < a.Length() && k < 3; k++) *dst[k] = a.Get(k).As<Napi::Number>().Uint32Value();
    return s;
  }

 private:
  Napi::Value next() {
    if (i_ >= info_.Length()) throw Napi::TypeError::New(info_.Env(), "missing argument " + std::to_string(i_));
    return info_[i_++];
  }
  const Napi::CallbackInfo &info_;
  size_t i_ = 0;
};

class Context;
void DeliverJob(Napi::Env env, Napi::Function fn, Context *self, Job *job);
using Tsfn = Napi::TypedThreadSafeFunction<Context, Job, DeliverJob>;

class Context : public Napi::ObjectWrap<Context> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Context(const Napi::CallbackInfo &info);
  ~Context() override;

 private:
  // queue plumbing
  Napi::Value Enqueue(Napi::Env env, std::function<TSS2_RC(ESYS_CONTEXT *, Out &)> run, bool needsContext = true);
  void Worker();
  friend void DeliverJob(Napi::Env env, Napi::Function fn, Context *self, Job *job);

  Napi::Value Open(const Napi::CallbackInfo &info);
  Napi::Value Close(const Napi::CallbackInfo &info);
  Napi::Value Startup(const Napi::CallbackInfo &info);
  Napi::Value GetCapability(const Napi::CallbackInfo &info);
  Napi::Value GetRandom(const Napi::CallbackInfo &info);
  Napi::Value TrFromTpmPublic(const Napi::CallbackInfo &info);
  Napi::Value TrSetAuth(const Napi::CallbackInfo &info);
  Napi::Value TrGetName(const Napi::CallbackInfo &info);
  Napi::Value TrClose(const Napi::CallbackInfo &info);
  Napi::Value FlushContext(const Napi::CallbackInfo &info);
  Napi::Value StartAuthSession(const Napi::CallbackInfo &info);
  Napi::Value SessionSetAttributes(const Napi::CallbackInfo &info);
  Napi::Value CreatePrimary(const Napi::CallbackInfo &info);
  Napi::Value Create(const Napi::CallbackInfo &info);
  Napi::Value CreateLoaded(const Napi::CallbackInfo &info);
  Napi::Value Load(const Napi::CallbackInfo &info);
  Napi::Value ReadPublic(const Napi::CallbackInfo &info);
  Napi::Value EvictControl(const Napi::CallbackInfo &info);
  Napi::Value Sign(const Napi::CallbackInfo &info);
  Napi::Value RsaDecrypt(const Napi::CallbackInfo &info);
  Napi::Value EcdhZGen(const Napi::CallbackInfo &info);
  Napi::Value Hmac(const Napi::CallbackInfo &info);
  Napi::Value EncryptDecrypt2(const Napi::CallbackInfo &info);
  Napi::Value Unseal(const Napi::CallbackInfo &info);
  Napi::Value Import(const Napi::CallbackInfo &info);
  Napi::Value Certify(const Napi::CallbackInfo &info);
  Napi::Value Quote(const Napi::CallbackInfo &info);
  Napi::Value PcrRead(const Napi::CallbackInfo &info);
  Napi::Value PcrExtend(const Napi::CallbackInfo &info);
  Napi::Value PolicyPcr(const Napi::CallbackInfo &info);
  Napi::Value PolicyAuthValue(const Napi::CallbackInfo &info);
  Napi::Value PolicyGetDigest(const Napi::CallbackInfo &info);
  Napi::Value NvDefineSpace(const Napi::CallbackInfo &info);
  Napi::Value NvUndefineSpace(const Napi::CallbackInfo &info);
  Napi::Value NvWrite(const Napi::CallbackInfo &info);
  Napi::Value NvRead(const Napi::CallbackInfo &info);
  Napi::Value NvReadPublic(const Napi::CallbackInfo &info);

  std::string tcti_;
  ESYS_CONTEXT *esys_ = nullptr;
  TSS2_TCTI_CONTEXT *tcti_ctx_ = nullptr;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job *> queue_;
  Tsfn tsfn_;
  bool started_ = false;
  bool closed_ = false;
  size_t pending_ = 0;  // JS thread only
};

Napi::Function Context::Define(Napi::Env env) {
  return DefineClass(env, "Context",
                     {
                         InstanceMethod<&Context::Open>("open"),
                         InstanceMethod<&Context::Close>("close"),
                         InstanceMethod<&Context::Startup>("startup"),
                         InstanceMethod<&Context::GetCapability>("getCapability"),
                         InstanceMethod<&Context::GetRandom>("getRandom"),
                         InstanceMethod<&Context::TrFromTpmPublic>("trFromTpmPublic"),
                         InstanceMethod<&Context::TrSetAuth>("trSetAuth"),
                         InstanceMethod<&Context::TrGetName>("trGetName"),
                         InstanceMethod<&Context::TrClose>("trClose"),
                         InstanceMethod<&Context::FlushContext>("flushContext"),
                         InstanceMethod<&Context::StartAuthSession>("startAuthSession"),
                         InstanceMethod<&Context::SessionSetAttributes>("sessionSetAttributes"),
                         InstanceMethod<&Context::CreatePrimary>("createPrimary"),
                         InstanceMethod<&Context::Create>("create"),
                         InstanceMethod<&Context::CreateLoaded>("createLoaded"),
                         InstanceMethod<&Context::Load>("load"),
                         InstanceMethod<&Context::ReadPublic>("readPublic"),
                         InstanceMethod<&Context::EvictControl>("evictControl"),
                         InstanceMethod<&Context::Sign>("sign"),
                         InstanceMethod<&Context::RsaDecrypt>("rsaDecrypt"),
                         InstanceMethod<&Context::EcdhZGen>("ecdhZGen"),
                         InstanceMethod<&Context::Hmac>("hmac"),
                         InstanceMethod<&Context::EncryptDecrypt2>("encryptDecrypt2"),
                         InstanceMethod<&Context::Unseal>("unseal"),
                         InstanceMethod<&Context::Import>("import"),
                         InstanceMethod<&Context::Certify>("certify"),
                         InstanceMethod<&Context::Quote>("quote"),
                         InstanceMethod<&Context::PcrRead>("pcrRead"),
                         InstanceMethod<&Context::PcrExtend>("pcrExtend"),
                         InstanceMethod<&Context::PolicyPcr>("policyPcr"),
                         InstanceMethod<&Context::PolicyAuthValue>("policyAuthValue"),
                         InstanceMethod<&Context::PolicyGetDigest>("policyGetDigest"),
                         InstanceMethod<&Context::NvDefineSpace>("nvDefineSpace"),
                         InstanceMethod<&Context::NvUndefineSpace>("nvUndefineSpace"),
                         InstanceMethod<&Context::NvWrite>("nvWrite"),
                         InstanceMethod<&Context::NvRead>("nvRead"),
                         InstanceMethod<&Context::NvReadPublic>("nvReadPublic"),
                     });
}

Context::Context(const Napi::CallbackInfo &info) : Napi::ObjectWrap<Context>(info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "TCTI string expected");
  tcti_ = info[0].As<Napi::String>().Utf8Value();
  tsfn_ = Tsfn::New(info.Env(), "tpm2-esys", 0, 1, this);
  tsfn_.Unref(info.Env());
  thread_ = std::thread(&Context::Worker, this);
  started_ = true;
}

Context::~Context() {
  if (started_ && thread_.joinable()) {
    // not closed by JS: stop the worker without delivering anything
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      queue_.push_back(nullptr);
    }
    cv_.notify_one();
    thread_.join();
    tsfn_.Release();
  }
}

void Context::Worker() {
  for (;;) {
    Job *job = nullptr;
    // A caller that awaits one TPM call at a time sends the next one a few tens of microseconds
    // after the previous answer: poll briefly before sleeping, which saves a futex wake-up per
    // call (bounded: at most kSpin of one core after each answer).
    const auto spinUntil = std::chrono::steady_clock::now() + kSpin;
    while (job == nullptr && std::chrono::steady_clock::now() < spinUntil) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!queue_.empty()) {
          job = queue_.front();
          queue_.pop_front();
        }
      }
      if (job == nullptr) std::this_thread::yield();
    }
    if (job == nullptr) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !queue_.empty(); });
      job = queue_.front();
      queue_.pop_front();
    }
    if (job == nullptr) {  // destructor: finalize and stop
      if (esys_ != nullptr) Esys_Finalize(&esys_);
      if (tcti_ctx_ != nullptr) Tss2_TctiLdr_Finalize(&tcti_ctx_);
      return;
    }
    if (esys_ == nullptr && job->needsContext) {
      job->failure = "not open";
    } else {
      job->rc = job->run(esys_, job->out);
    }
    bool last = job->last;
    tsfn_.BlockingCall(job);
    if (last) return;
  }
}

void DeliverJob(Napi::Env env, Napi::Function, Context *self, Job *job) {
  std::unique_ptr<Job> owned(job);
  if (env != nullptr) {
    if (!job->failure.empty()) {
      job->deferred.Reject(Napi::Error::New(env, job->failure).Value());
    } else if (job->rc != TSS2_RC_SUCCESS) {
      auto err = Napi::Error::New(env, std::string(Tss2_RC_Decode(job->rc)));
      err.Set("rc", Napi::Number::New(env, job->rc));
      job->deferred.Reject(err.Value());
    } else {
      auto o = Napi::Object::New(env);
      for (auto &kv : job->out.bytes) {
        o.Set(kv.first, Napi::Buffer<uint8_t>::Copy(env, kv.second.data(), kv.second.size()));
        std::fill(kv.second.begin(), kv.second.end(), 0);
      }
      for (auto &kv : job->out.numbers) o.Set(kv.first, Napi::Number::New(env, kv.second));
      job->deferred.Resolve(o);
    }
  }
  if (self != nullptr && env != nullptr) {
    if (--self->pending_ == 0) self->tsfn_.Unref(env);
    if (job->last && self->thread_.joinable()) {
      self->thread_.join();
      self->started_ = false;
      self->tsfn_.Release();
    }
  }
}

Napi::Value Context::Enqueue(Napi::Env env, std::function<TSS2_RC(ESYS_CONTEXT *, Out &)> run, bool needsContext) {
  auto *job = new Job(env);
  auto promise = job->deferred.Promise();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      job->deferred.Reject(Napi::Error::New(env, "closed").Value());
      delete job;
      return promise;
    }
    job->run = std::move(run);
    job->needsContext = needsContext;
    queue_.push_back(job);
  }
  if (pending_++ == 0) tsfn_.Ref(env);
  cv_.notify_one();
  return promise;
}

// ---- calls -------------------------------------------------------------------------------------

Napi::Value Context::Open(const Napi::CallbackInfo &info) {
  return Enqueue(info.Env(), [this](ESYS_CONTEXT *, Out &) -> TSS2_RC {
    TSS2_RC rc = Tss2_TctiLdr_Initialize(tcti_.c_str(), &tcti_ctx_);
    if (rc != TSS2_RC_SUCCESS) return rc;
    rc = Esys_Initialize(&esys_, tcti_ctx_, nullptr);
    if (rc != TSS2_RC_SUCCESS) {
      Tss2_TctiLdr_Finalize(&tcti_ctx_);
      esys_ = nullptr;
    }
    return rc;
  }, false);
}

Napi::Value Context::Close(const Napi::CallbackInfo &info) {
  // runs even when open failed: the worker finalizes whatever exists, then stops
  auto *job = new Job(info.Env());
  auto promise = job->deferred.Promise();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      job->deferred.Resolve(Napi::Object::New(info.Env()));
      delete job;
      return promise;
    }
    closed_ = true;
    job->last = true;
    job->run = [this](ESYS_CONTEXT *, Out &) -> TSS2_RC {
      if (esys_ != nullptr) Esys_Finalize(&esys_);
      if (tcti_ctx_ != nullptr) Tss2_TctiLdr_Finalize(&tcti_ctx_);
      esys_ = nullptr;
      return TSS2_RC_SUCCESS;
    };
    job->needsContext = false;
    queue_.push_back(job);
  }
  if (pending_++ == 0) tsfn_.Ref(info.Env());
  cv_.notify_one();
  return promise;
}

Napi::Value Context::Startup(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t type = a.u32();
  return Enqueue(info.Env(), [type](ESYS_CONTEXT *c, Out &) { return Esys_Startup(c, static_cast<TPM2_SU>(type)); });
}

Napi::Value Context::GetCapability(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t cap = a.u32(), prop = a.u32(), count = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPMI_YES_NO more = 0;
    TPMS_CAPABILITY_DATA *data = nullptr;
    TSS2_RC rc = Esys_GetCapability(c, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, cap, prop, count, &more, &data);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["data"] = marshal(data, Tss2_MU_TPMS_CAPABILITY_DATA_Marshal);
      o.numbers["more"] = more;
    }
    Esys_Free(data);
    return rc;
  });
}

Napi::Value Context::GetRandom(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t n = a.u32();
  auto s = a.sessions();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_DIGEST *r = nullptr;
    TSS2_RC rc = Esys_GetRandom(c, s.s1, s.s2, s.s3, static_cast<UINT16>(n), &r);
    if (rc == TSS2_RC_SUCCESS) o.bytes["random"] = Bytes(r->buffer, r->buffer + r->size);
    Esys_Free(r);
    return rc;
  });
}

Napi::Value Context::TrFromTpmPublic(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  auto s = a.sessions();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR tr = ESYS_TR_NONE;
    TSS2_RC rc = Esys_TR_FromTPMPublic(c, h, s.s1, s.s2, s.s3, &tr);
    if (rc == TSS2_RC_SUCCESS) o.numbers["handle"] = tr;
    return rc;
  });
}

Napi::Value Context::TrSetAuth(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  auto auth = a.tpm2b<TPM2B_AUTH>();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) {
    TSS2_RC rc = Esys_TR_SetAuth(c, h, auth.get());
    std::memset(auth.get(), 0, sizeof(TPM2B_AUTH));
    return rc;
  });
}

Napi::Value Context::TrGetName(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_NAME *name = nullptr;
    TSS2_RC rc = Esys_TR_GetName(c, h, &name);
    if (rc == TSS2_RC_SUCCESS) o.bytes["name"] = Bytes(name->name, name->name + name->size);
    Esys_Free(name);
    return rc;
  });
}

Napi::Value Context::TrClose(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) {
    ESYS_TR tr = h;
    return Esys_TR_Close(c, &tr);
  });
}

Napi::Value Context::FlushContext(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) { return Esys_FlushContext(c, h); });
}

Napi::Value Context::StartAuthSession(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t tpmKey = a.u32(), bind = a.u32(), type = a.u32();
  auto sym = a.mu<TPMT_SYM_DEF>(Tss2_MU_TPMT_SYM_DEF_Unmarshal);
  uint32_t hash = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR session = ESYS_TR_NONE;
    TSS2_RC rc = Esys_StartAuthSession(c, tpmKey, bind, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, nullptr,
                                       static_cast<TPM2_SE>(type), sym.get(), static_cast<TPMI_ALG_HASH>(hash), &session);
    if (rc == TSS2_RC_SUCCESS) o.numbers["handle"] = session;
    return rc;
  });
}

Napi::Value Context::SessionSetAttributes(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32(), flags = a.u32(), mask = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) {
    return Esys_TRSess_SetAttributes(c, h, static_cast<TPMA_SESSION>(flags), static_cast<TPMA_SESSION>(mask));
  });
}

Napi::Value Context::CreatePrimary(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t hierarchy = a.u32();
  auto s = a.sessions();
  auto sens = a.mu<TPM2B_SENSITIVE_CREATE>(Tss2_MU_TPM2B_SENSITIVE_CREATE_Unmarshal);
  auto pub = a.mu<TPM2B_PUBLIC>(Tss2_MU_TPM2B_PUBLIC_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_DATA outside = {};
    TPML_PCR_SELECTION pcrs = {};
    ESYS_TR handle = ESYS_TR_NONE;
    TPM2B_PUBLIC *outPub = nullptr;
    TPM2B_CREATION_DATA *cd = nullptr;
    TPM2B_DIGEST *ch = nullptr;
    TPMT_TK_CREATION *tk = nullptr;
    TSS2_RC rc = Esys_CreatePrimary(c, hierarchy, s.s1, s.s2, s.s3, sens.get(), pub.get(), &outside, &pcrs, &handle, &outPub, &cd, &ch, &tk);
    std::memset(sens.get(), 0, sizeof(TPM2B_SENSITIVE_CREATE));
    if (rc == TSS2_RC_SUCCESS) {
      o.numbers["handle"] = handle;
      o.bytes["public"] = marshal(outPub, Tss2_MU_TPM2B_PUBLIC_Marshal);
    }
    Esys_Free(outPub);
    Esys_Free(cd);
    Esys_Free(ch);
    Esys_Free(tk);
    return rc;
  });
}

Napi::Value Context::Create(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t parent = a.u32();
  auto s = a.sessions();
  auto sens = a.mu<TPM2B_SENSITIVE_CREATE>(Tss2_MU_TPM2B_SENSITIVE_CREATE_Unmarshal);
  auto pub = a.mu<TPM2B_PUBLIC>(Tss2_MU_TPM2B_PUBLIC_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_DATA outside = {};
    TPML_PCR_SELECTION pcrs = {};
    TPM2B_PRIVATE *outPriv = nullptr;
    TPM2B_PUBLIC *outPub = nullptr;
    TPM2B_CREATION_DATA *cd = nullptr;
    TPM2B_DIGEST *ch = nullptr;
    TPMT_TK_CREATION *tk = nullptr;
    TSS2_RC rc = Esys_Create(c, parent, s.s1, s.s2, s.s3, sens.get(), pub.get(), &outside, &pcrs, &outPriv, &outPub, &cd, &ch, &tk);
    std::memset(sens.get(), 0, sizeof(TPM2B_SENSITIVE_CREATE));
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["private"] = marshal(outPriv, Tss2_MU_TPM2B_PRIVATE_Marshal);
      o.bytes["public"] = marshal(outPub, Tss2_MU_TPM2B_PUBLIC_Marshal);
    }
    Esys_Free(outPriv);
    Esys_Free(outPub);
    Esys_Free(cd);
    Esys_Free(ch);
    Esys_Free(tk);
    return rc;
  });
}

Napi::Value Context::CreateLoaded(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t parent = a.u32();
  auto s = a.sessions();
  auto sens = a.mu<TPM2B_SENSITIVE_CREATE>(Tss2_MU_TPM2B_SENSITIVE_CREATE_Unmarshal);
  auto tmpl = a.tpm2b<TPM2B_TEMPLATE>();  // the TPMT_PUBLIC wire bytes (or TPMT_TEMPLATE with derive params)
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR handle = ESYS_TR_NONE;
    TPM2B_PRIVATE *outPriv = nullptr;
    TPM2B_PUBLIC *outPub = nullptr;
    TSS2_RC rc = Esys_CreateLoaded(c, parent, s.s1, s.s2, s.s3, sens.get(), tmpl.get(), &handle, &outPriv, &outPub);
    std::memset(sens.get(), 0, sizeof(TPM2B_SENSITIVE_CREATE));
    if (rc == TSS2_RC_SUCCESS) {
      o.numbers["handle"] = handle;
      o.bytes["private"] = marshal(outPriv, Tss2_MU_TPM2B_PRIVATE_Marshal);
      o.bytes["public"] = marshal(outPub, Tss2_MU_TPM2B_PUBLIC_Marshal);
    }
    Esys_Free(outPriv);
    Esys_Free(outPub);
    return rc;
  });
}

Napi::Value Context::Load(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t parent = a.u32();
  auto s = a.sessions();
  auto priv = a.mu<TPM2B_PRIVATE>(Tss2_MU_TPM2B_PRIVATE_Unmarshal);
  auto pub = a.mu<TPM2B_PUBLIC>(Tss2_MU_TPM2B_PUBLIC_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR handle = ESYS_TR_NONE;
    TSS2_RC rc = Esys_Load(c, parent, s.s1, s.s2, s.s3, priv.get(), pub.get(), &handle);
    if (rc == TSS2_RC_SUCCESS) o.numbers["handle"] = handle;
    return rc;
  });
}

Napi::Value Context::ReadPublic(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t h = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_PUBLIC *pub = nullptr;
    TPM2B_NAME *name = nullptr, *qn = nullptr;
    TSS2_RC rc = Esys_ReadPublic(c, h, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, &name, &qn);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["public"] = marshal(pub, Tss2_MU_TPM2B_PUBLIC_Marshal);
      o.bytes["name"] = Bytes(name->name, name->name + name->size);
    }
    Esys_Free(pub);
    Esys_Free(name);
    Esys_Free(qn);
    return rc;
  });
}

Napi::Value Context::EvictControl(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t auth = a.u32(), object = a.u32();
  auto s = a.sessions();
  uint32_t persistent = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR out = ESYS_TR_NONE;
    TSS2_RC rc = Esys_EvictControl(c, auth, object, s.s1, s.s2, s.s3, persistent, &out);
    if (rc == TSS2_RC_SUCCESS) o.numbers["handle"] = out;
    return rc;
  });
}

Napi::Value Context::Sign(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t key = a.u32();
  auto s = a.sessions();
  auto digest = a.tpm2b<TPM2B_DIGEST>();
  auto scheme = a.mu<TPMT_SIG_SCHEME>(Tss2_MU_TPMT_SIG_SCHEME_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPMT_TK_HASHCHECK ticket = {};
    ticket.tag = TPM2_ST_HASHCHECK;
    ticket.hierarchy = TPM2_RH_NULL;
    TPMT_SIGNATURE *sig = nullptr;
    TSS2_RC rc = Esys_Sign(c, key, s.s1, s.s2, s.s3, digest.get(), scheme.get(), &ticket, &sig);
    if (rc == TSS2_RC_SUCCESS) o.bytes["signature"] = marshal(sig, Tss2_MU_TPMT_SIGNATURE_Marshal);
    Esys_Free(sig);
    return rc;
  });
}

Napi::Value Context::RsaDecrypt(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t key = a.u32();
  auto s = a.sessions();
  auto cipher = a.tpm2b<TPM2B_PUBLIC_KEY_RSA>();
  auto scheme = a.mu<TPMT_RSA_DECRYPT>(Tss2_MU_TPMT_RSA_DECRYPT_Unmarshal);
  auto label = a.tpm2b<TPM2B_DATA>();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_PUBLIC_KEY_RSA *msg = nullptr;
    TSS2_RC rc = Esys_RSA_Decrypt(c, key, s.s1, s.s2, s.s3, cipher.get(), scheme.get(), label.get(), &msg);
    if (rc == TSS2_RC_SUCCESS) o.bytes["message"] = Bytes(msg->buffer, msg->buffer + msg->size);
    freeWiped(msg);
    return rc;
  });
}

Napi::Value Context::EcdhZGen(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t key = a.u32();
  auto s = a.sessions();
  auto point = a.mu<TPM2B_ECC_POINT>(Tss2_MU_TPM2B_ECC_POINT_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_ECC_POINT *out = nullptr;
    TSS2_RC rc = Esys_ECDH_ZGen(c, key, s.s1, s.s2, s.s3, point.get(), &out);
    if (rc == TSS2_RC_SUCCESS) o.bytes["x"] = Bytes(out->point.x.buffer, out->point.x.buffer + out->point.x.size);
    freeWiped(out);
    return rc;
  });
}

Napi::Value Context::Hmac(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t key = a.u32();
  auto s = a.sessions();
  auto data = a.tpm2b<TPM2B_MAX_BUFFER>();
  uint32_t hash = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_DIGEST *mac = nullptr;
    TSS2_RC rc = Esys_HMAC(c, key, s.s1, s.s2, s.s3, data.get(), static_cast<TPMI_ALG_HASH>(hash), &mac);
    if (rc == TSS2_RC_SUCCESS) o.bytes["mac"] = Bytes(mac->buffer, mac->buffer + mac->size);
    Esys_Free(mac);
    return rc;
  });
}

Napi::Value Context::EncryptDecrypt2(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t key = a.u32();
  auto s = a.sessions();
  auto data = a.tpm2b<TPM2B_MAX_BUFFER>();
  uint32_t decrypt = a.u32(), mode = a.u32();
  auto iv = a.tpm2b<TPM2B_IV>();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_MAX_BUFFER *out = nullptr;
    TPM2B_IV *ivOut = nullptr;
    TSS2_RC rc = Esys_EncryptDecrypt2(c, key, s.s1, s.s2, s.s3, data.get(), static_cast<TPMI_YES_NO>(decrypt),
                                      static_cast<TPMI_ALG_CIPHER_MODE>(mode), iv.get(), &out, &ivOut);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["data"] = Bytes(out->buffer, out->buffer + out->size);
      o.bytes["iv"] = Bytes(ivOut->buffer, ivOut->buffer + ivOut->size);
    }
    freeWiped(out);
    Esys_Free(ivOut);
    return rc;
  });
}

Napi::Value Context::Unseal(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t item = a.u32();
  auto s = a.sessions();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_SENSITIVE_DATA *data = nullptr;
    TSS2_RC rc = Esys_Unseal(c, item, s.s1, s.s2, s.s3, &data);
    if (rc == TSS2_RC_SUCCESS) o.bytes["data"] = Bytes(data->buffer, data->buffer + data->size);
    freeWiped(data);
    return rc;
  });
}

Napi::Value Context::Import(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t parent = a.u32();
  auto s = a.sessions();
  auto encKey = a.tpm2b<TPM2B_DATA>();
  auto pub = a.mu<TPM2B_PUBLIC>(Tss2_MU_TPM2B_PUBLIC_Unmarshal);
  auto dup = a.mu<TPM2B_PRIVATE>(Tss2_MU_TPM2B_PRIVATE_Unmarshal);
  auto seed = a.mu<TPM2B_ENCRYPTED_SECRET>(Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal);
  auto sym = a.mu<TPMT_SYM_DEF_OBJECT>(Tss2_MU_TPMT_SYM_DEF_OBJECT_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_PRIVATE *outPriv = nullptr;
    TSS2_RC rc = Esys_Import(c, parent, s.s1, s.s2, s.s3, encKey.get(), pub.get(), dup.get(), seed.get(), sym.get(), &outPriv);
    if (rc == TSS2_RC_SUCCESS) o.bytes["private"] = marshal(outPriv, Tss2_MU_TPM2B_PRIVATE_Marshal);
    Esys_Free(outPriv);
    return rc;
  });
}

Napi::Value Context::Certify(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t object = a.u32(), signer = a.u32();
  auto s = a.sessions();
  auto qualifying = a.tpm2b<TPM2B_DATA>();
  auto scheme = a.mu<TPMT_SIG_SCHEME>(Tss2_MU_TPMT_SIG_SCHEME_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_ATTEST *attest = nullptr;
    TPMT_SIGNATURE *sig = nullptr;
    TSS2_RC rc = Esys_Certify(c, object, signer, s.s1, s.s2, s.s3, qualifying.get(), scheme.get(), &attest, &sig);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["attest"] = Bytes(attest->attestationData, attest->attestationData + attest->size);
      o.bytes["signature"] = marshal(sig, Tss2_MU_TPMT_SIGNATURE_Marshal);
    }
    Esys_Free(attest);
    Esys_Free(sig);
    return rc;
  });
}

Napi::Value Context::Quote(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t signer = a.u32();
  auto s = a.sessions();
  auto qualifying = a.tpm2b<TPM2B_DATA>();
  auto scheme = a.mu<TPMT_SIG_SCHEME>(Tss2_MU_TPMT_SIG_SCHEME_Unmarshal);
  auto pcrs = a.mu<TPML_PCR_SELECTION>(Tss2_MU_TPML_PCR_SELECTION_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_ATTEST *attest = nullptr;
    TPMT_SIGNATURE *sig = nullptr;
    TSS2_RC rc = Esys_Quote(c, signer, s.s1, s.s2, s.s3, qualifying.get(), scheme.get(), pcrs.get(), &attest, &sig);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["attest"] = Bytes(attest->attestationData, attest->attestationData + attest->size);
      o.bytes["signature"] = marshal(sig, Tss2_MU_TPMT_SIGNATURE_Marshal);
    }
    Esys_Free(attest);
    Esys_Free(sig);
    return rc;
  });
}

Napi::Value Context::PcrRead(const Napi::CallbackInfo &info) {
  Args a(info);
  auto sel = a.mu<TPML_PCR_SELECTION>(Tss2_MU_TPML_PCR_SELECTION_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    UINT32 counter = 0;
    TPML_PCR_SELECTION *selOut = nullptr;
    TPML_DIGEST *values = nullptr;
    TSS2_RC rc = Esys_PCR_Read(c, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, sel.get(), &counter, &selOut, &values);
    if (rc == TSS2_RC_SUCCESS) {
      o.numbers["updateCounter"] = counter;
      o.bytes["selection"] = marshal(selOut, Tss2_MU_TPML_PCR_SELECTION_Marshal);
      o.bytes["values"] = marshal(values, Tss2_MU_TPML_DIGEST_Marshal);
    }
    Esys_Free(selOut);
    Esys_Free(values);
    return rc;
  });
}

Napi::Value Context::PcrExtend(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t pcr = a.u32();
  auto s = a.sessions();
  auto digests = a.mu<TPML_DIGEST_VALUES>(Tss2_MU_TPML_DIGEST_VALUES_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) { return Esys_PCR_Extend(c, pcr, s.s1, s.s2, s.s3, digests.get()); });
}

Napi::Value Context::PolicyPcr(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t session = a.u32();
  auto digest = a.tpm2b<TPM2B_DIGEST>();
  auto pcrs = a.mu<TPML_PCR_SELECTION>(Tss2_MU_TPML_PCR_SELECTION_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) {
    return Esys_PolicyPCR(c, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, digest.get(), pcrs.get());
  });
}

Napi::Value Context::PolicyAuthValue(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t session = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) { return Esys_PolicyAuthValue(c, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE); });
}

Napi::Value Context::PolicyGetDigest(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t session = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_DIGEST *d = nullptr;
    TSS2_RC rc = Esys_PolicyGetDigest(c, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &d);
    if (rc == TSS2_RC_SUCCESS) o.bytes["digest"] = Bytes(d->buffer, d->buffer + d->size);
    Esys_Free(d);
    return rc;
  });
}

Napi::Value Context::NvDefineSpace(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t authHandle = a.u32();
  auto s = a.sessions();
  auto auth = a.tpm2b<TPM2B_AUTH>();
  auto pub = a.mu<TPM2B_NV_PUBLIC>(Tss2_MU_TPM2B_NV_PUBLIC_Unmarshal);
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    ESYS_TR nv = ESYS_TR_NONE;
    TSS2_RC rc = Esys_NV_DefineSpace(c, authHandle, s.s1, s.s2, s.s3, auth.get(), pub.get(), &nv);
    std::memset(auth.get(), 0, sizeof(TPM2B_AUTH));
    if (rc == TSS2_RC_SUCCESS) o.numbers["handle"] = nv;
    return rc;
  });
}

Napi::Value Context::NvUndefineSpace(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t authHandle = a.u32(), nv = a.u32();
  auto s = a.sessions();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) { return Esys_NV_UndefineSpace(c, authHandle, nv, s.s1, s.s2, s.s3); });
}

Napi::Value Context::NvWrite(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t authHandle = a.u32(), nv = a.u32();
  auto s = a.sessions();
  auto data = a.tpm2b<TPM2B_MAX_NV_BUFFER>();
  uint32_t offset = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &) {
    TSS2_RC rc = Esys_NV_Write(c, authHandle, nv, s.s1, s.s2, s.s3, data.get(), static_cast<UINT16>(offset));
    std::memset(data.get(), 0, sizeof(TPM2B_MAX_NV_BUFFER));
    return rc;
  });
}

Napi::Value Context::NvRead(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t authHandle = a.u32(), nv = a.u32();
  auto s = a.sessions();
  uint32_t size = a.u32(), offset = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_MAX_NV_BUFFER *data = nullptr;
    TSS2_RC rc = Esys_NV_Read(c, authHandle, nv, s.s1, s.s2, s.s3, static_cast<UINT16>(size), static_cast<UINT16>(offset), &data);
    if (rc == TSS2_RC_SUCCESS) o.bytes["data"] = Bytes(data->buffer, data->buffer + data->size);
    freeWiped(data);
    return rc;
  });
}

Napi::Value Context::NvReadPublic(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t nv = a.u32();
  return Enqueue(info.Env(), [=](ESYS_CONTEXT *c, Out &o) {
    TPM2B_NV_PUBLIC *pub = nullptr;
    TPM2B_NAME *name = nullptr;
    TSS2_RC rc = Esys_NV_ReadPublic(c, nv, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &pub, &name);
    if (rc == TSS2_RC_SUCCESS) {
      o.bytes["public"] = marshal(pub, Tss2_MU_TPM2B_NV_PUBLIC_Marshal);
      o.bytes["name"] = Bytes(name->name, name->name + name->size);
    }
    Esys_Free(pub);
    Esys_Free(name);
    return rc;
  });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Context", Context::Define(env));
  return exports;
}

}  // namespace

NODE_API_MODULE(tpm2_esys, Init)
