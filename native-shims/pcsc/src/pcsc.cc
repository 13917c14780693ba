// pcsc_lite: a thin N-API binding over pcsc-lite (libpcsclite), only the calls the PC/SC APDU
// transport uses (src/backends/pcsc/pcsc-transport.ts).
//
// One Context = one SCARDCONTEXT owned by one worker thread with a FIFO queue: every call
// returns a Promise, its arguments are copied on the JS thread, the SCard* function runs on the
// worker, and the Promise settles on the JS thread. pcsc-lite serialises the calls made on one
// SCARDCONTEXT, so a caller that waits for reader events (SCardGetStatusChange) while it talks
// to a card uses a second Context for the waiting; cancel() and close() end a wait in progress
// with SCardCancel from a libuv pool thread.
//
// Card handles (SCARDHANDLE, a `long` on 64-bit Linux) never reach JavaScript: the Context keeps
// a table and hands out small integer ids. A failing call rejects with an Error whose `code` is
// the SCARD_E_* / SCARD_W_* value (as an unsigned 32-bit number) and whose message is
// pcsc_stringify_error's text; APDU bytes never appear in a message, and the native copies of
// command and response APDUs are wiped after use.
#include <winscard.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <napi.h>

namespace {

using Bytes = std::vector<uint8_t>;

void wipe(Bytes &b) {
  volatile uint8_t *p = b.data();
  for (size_t i = 0; i < b.size(); i++) p[i] = 0;
}

// Bytes that may hold a PIN or key material (command and response APDUs): wiped when dropped.
struct SecretBytes {
  Bytes b;
  SecretBytes() = default;
  SecretBytes(const SecretBytes &) = delete;
  SecretBytes &operator=(const SecretBytes &) = delete;
  ~SecretBytes() {
    b.resize(b.capacity());
    wipe(b);
  }
};

uint32_t scardCode(LONG rv) { return static_cast<uint32_t>(rv); }

enum class Kind { Call, Wait, Close };

struct Job {
  Kind kind = Kind::Call;
  bool needsContext = true;                        // false for open and close
  std::function<LONG()> run;                       // on the worker thread
  std::function<Napi::Value(Napi::Env)> result;    // on the JS thread, after success
  Napi::Promise::Deferred deferred;
  LONG rv = SCARD_S_SUCCESS;
  std::string failure;  // a failure that is not an SCARD code
  explicit Job(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

// Arguments read in order from a JS call.
class Args {
 public:
  explicit Args(const Napi::CallbackInfo &info) : info_(info) {}

  uint32_t u32() {
    Napi::Value v = next();
    if (!v.IsNumber()) throw Napi::TypeError::New(info_.Env(), where() + "number expected");
    return v.As<Napi::Number>().Uint32Value();
  }

  std::string str() {
    Napi::Value v = next();
    if (!v.IsString()) throw Napi::TypeError::New(info_.Env(), where() + "string expected");
    return v.As<Napi::String>().Utf8Value();
  }

  void bytes(Bytes &out) {
    Napi::Value v = next();
    if (!v.IsBuffer()) throw Napi::TypeError::New(info_.Env(), where() + "Buffer expected");
    auto b = v.As<Napi::Buffer<uint8_t>>();
    out.assign(b.Data(), b.Data() + b.Length());
  }

  Napi::Array array() {
    Napi::Value v = next();
    if (!v.IsArray()) throw Napi::TypeError::New(info_.Env(), where() + "array expected");
    return v.As<Napi::Array>();
  }

 private:
  Napi::Value next() {
    if (i_ >= info_.Length()) throw Napi::TypeError::New(info_.Env(), "missing argument " + std::to_string(i_));
    return info_[i_++];
  }
  std::string where() const { return "argument " + std::to_string(i_ - 1) + ": "; }
  const Napi::CallbackInfo &info_;
  size_t i_ = 0;
};

Napi::Error scardError(Napi::Env env, LONG rv) {
  auto err = Napi::Error::New(env, std::string(pcsc_stringify_error(rv)));
  err.Set("code", Napi::Number::New(env, scardCode(rv)));
  return err;
}

// Whether the thread-safe function still exists. At environment teardown Node may finalize it
// before this object's destructor runs; the worker must not call it after that.
struct TsfnLink {
  std::mutex mu;
  bool gone = false;
};
using TsfnLinkRef = std::shared_ptr<TsfnLink>;

class Context;
void DeliverJob(Napi::Env env, Napi::Function fn, Context *self, Job *job);
using Tsfn = Napi::TypedThreadSafeFunction<Context, Job, DeliverJob>;

class Context : public Napi::ObjectWrap<Context> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Context(const Napi::CallbackInfo &info);
  ~Context() override;

  // Ends the SCardGetStatusChange in progress when there is one (any thread but the worker).
  void CancelWait();
  // Keeps this object alive while a job or a cancel task is pending (JS thread only).
  void Hold();
  void Release();

 private:
  friend void DeliverJob(Napi::Env env, Napi::Function fn, Context *self, Job *job);

  Napi::Value Enqueue(Napi::Env env, Kind kind, std::function<LONG()> run, std::function<Napi::Value(Napi::Env)> result = nullptr,
                      bool needsContext = true);
  void Worker();
  void RunJob(Job *job);
  void ReleaseAll();
  bool WaitInProgress(uint64_t *seq);
  LONG Lookup(uint32_t id, SCARDHANDLE *h) const;
  Napi::Value StartCancel(Napi::Env env);

  Napi::Value Open(const Napi::CallbackInfo &info);
  Napi::Value Close(const Napi::CallbackInfo &info);
  Napi::Value Cancel(const Napi::CallbackInfo &info);
  Napi::Value ListReaders(const Napi::CallbackInfo &info);
  Napi::Value Connect(const Napi::CallbackInfo &info);
  Napi::Value Reconnect(const Napi::CallbackInfo &info);
  Napi::Value Status(const Napi::CallbackInfo &info);
  Napi::Value Transmit(const Napi::CallbackInfo &info);
  Napi::Value BeginTransaction(const Napi::CallbackInfo &info);
  Napi::Value EndTransaction(const Napi::CallbackInfo &info);
  Napi::Value Disconnect(const Napi::CallbackInfo &info);
  Napi::Value GetStatusChange(const Napi::CallbackInfo &info);

  // worker thread only
  SCARDCONTEXT ctx_ = 0;
  bool established_ = false;
  std::unordered_map<uint32_t, SCARDHANDLE> handles_;
  uint32_t nextHandle_ = 1;

  // read by cancel tasks
  std::atomic<SCARDCONTEXT> cancelCtx_{0};

  std::thread thread_;
  std::mutex mu_;  // guards queue_, closed_, waiting_, waitSeq_
  std::condition_variable cv_;
  std::deque<Job *> queue_;
  bool closed_ = false;
  bool waiting_ = false;
  uint64_t waitSeq_ = 0;

  Tsfn tsfn_;
  TsfnLinkRef tsfnLink_ = std::make_shared<TsfnLink>();
  bool running_ = false;    // JS thread only: the worker runs and tsfn_ is live
  size_t jobsPending_ = 0;  // JS thread only: refs tsfn_ (keeps the event loop alive)
  size_t holds_ = 0;        // JS thread only: refs this object (no GC while work is pending)
};

class CancelTask : public Napi::AsyncWorker {
 public:
  CancelTask(Napi::Env env, Context *ctx) : Napi::AsyncWorker(env, "pcsc-cancel"), ctx_(ctx), deferred_(Napi::Promise::Deferred::New(env)) {
    ctx_->Hold();
  }
  Napi::Promise Promise() const { return deferred_.Promise(); }
  void Execute() override { ctx_->CancelWait(); }
  void OnOK() override {
    deferred_.Resolve(Env().Undefined());
    ctx_->Release();
  }
  void OnError(const Napi::Error &e) override {
    deferred_.Reject(e.Value());
    ctx_->Release();
  }

 private:
  Context *ctx_;
  Napi::Promise::Deferred deferred_;
};

Napi::Function Context::Define(Napi::Env env) {
  return DefineClass(env, "Context",
                     {
                         InstanceMethod<&Context::Open>("open"),
                         InstanceMethod<&Context::Close>("close"),
                         InstanceMethod<&Context::Cancel>("cancel"),
                         InstanceMethod<&Context::ListReaders>("listReaders"),
                         InstanceMethod<&Context::Connect>("connect"),
                         InstanceMethod<&Context::Reconnect>("reconnect"),
                         InstanceMethod<&Context::Status>("status"),
                         InstanceMethod<&Context::Transmit>("transmit"),
                         InstanceMethod<&Context::BeginTransaction>("beginTransaction"),
                         InstanceMethod<&Context::EndTransaction>("endTransaction"),
                         InstanceMethod<&Context::Disconnect>("disconnect"),
                         InstanceMethod<&Context::GetStatusChange>("getStatusChange"),
                     });
}

Context::Context(const Napi::CallbackInfo &info) : Napi::ObjectWrap<Context>(info) {
  tsfn_ = Tsfn::New(
      info.Env(), "pcsc-lite", 0, 1, this,
      [](Napi::Env, TsfnLinkRef *link, Context *) {
        {
          std::lock_guard<std::mutex> lock((*link)->mu);
          (*link)->gone = true;
        }
        delete link;
      },
      new TsfnLinkRef(tsfnLink_));
  tsfn_.Unref(info.Env());
  thread_ = std::thread(&Context::Worker, this);
  running_ = true;
}

Context::~Context() {
  if (!running_) return;
  // Not closed by JS (garbage collected, or the environment is torn down): release the context
  // on the worker without delivering anything.
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    queue_.push_back(nullptr);
  }
  cv_.notify_one();
  CancelWait();
  thread_.join();
  bool gone;
  {
    std::lock_guard<std::mutex> lock(tsfnLink_->mu);
    gone = tsfnLink_->gone;
  }
  if (!gone) tsfn_.Release();
}

void Context::Hold() {
  if (holds_++ == 0) Ref();
}

void Context::Release() {
  if (--holds_ == 0) Unref();
}

bool Context::WaitInProgress(uint64_t *seq) {
  std::lock_guard<std::mutex> lock(mu_);
  *seq = waitSeq_;
  return waiting_;
}

void Context::CancelWait() {
  // SCardCancel only ends a wait that has already entered pcsc-lite; the worker marks the wait
  // just before it does, so keep cancelling (bounded) until that very wait has returned.
  uint64_t seq = 0;
  if (!WaitInProgress(&seq)) return;
  for (int i = 0; i < 500; i++) {
    (void)SCardCancel(cancelCtx_.load());
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    uint64_t now = 0;
    if (!WaitInProgress(&now) || now != seq) return;
  }
}

void Context::Worker() {
  for (;;) {
    Job *job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return !queue_.empty(); });
      job = queue_.front();
      queue_.pop_front();
    }
    if (job == nullptr) {  // destructor
      ReleaseAll();
      return;
    }
    RunJob(job);
    bool last = job->kind == Kind::Close;
    {
      std::lock_guard<std::mutex> lock(tsfnLink_->mu);
      // environment shutting down: nothing to settle
      if (tsfnLink_->gone || tsfn_.BlockingCall(job) != napi_ok) delete job;
    }
    if (last) return;
  }
}

void Context::RunJob(Job *job) {
  if (job->needsContext && !established_) {
    job->failure = "the PC/SC context is not open";
    return;
  }
  if (job->kind != Kind::Wait) {
    job->rv = job->run();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      job->rv = SCARD_E_CANCELLED;
      return;
    }
    waiting_ = true;
    waitSeq_++;
  }
  job->rv = job->run();
  std::lock_guard<std::mutex> lock(mu_);
  waiting_ = false;
}

void Context::ReleaseAll() {
  // Handles JS did not disconnect: reset the card, so no other application inherits a
  // verified PIN.
  for (auto &kv : handles_) (void)SCardDisconnect(kv.second, SCARD_RESET_CARD);
  handles_.clear();
  if (established_) (void)SCardReleaseContext(ctx_);
  established_ = false;
  ctx_ = 0;
}

void DeliverJob(Napi::Env env, Napi::Function, Context *self, Job *job) {
  std::unique_ptr<Job> owned(job);
  if (env == nullptr) return;  // environment torn down: nothing to settle
  if (!job->failure.empty()) {
    job->deferred.Reject(Napi::Error::New(env, job->failure).Value());
  } else if (job->rv != SCARD_S_SUCCESS) {
    job->deferred.Reject(scardError(env, job->rv).Value());
  } else {
    try {
      job->deferred.Resolve(job->result ? job->result(env) : env.Undefined());
    } catch (const Napi::Error &e) {
      job->deferred.Reject(e.Value());
    }
  }
  if (--self->jobsPending_ == 0) self->tsfn_.Unref(env);
  if (job->kind == Kind::Close && self->running_) {
    self->thread_.join();
    self->running_ = false;
    self->tsfn_.Release();
  }
  self->Release();
}

Napi::Value Context::Enqueue(Napi::Env env, Kind kind, std::function<LONG()> run, std::function<Napi::Value(Napi::Env)> result,
                             bool needsContext) {
  auto *job = new Job(env);
  auto promise = job->deferred.Promise();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      job->deferred.Reject(Napi::Error::New(env, "the PC/SC context is closed").Value());
      delete job;
      return promise;
    }
    job->kind = kind;
    job->needsContext = needsContext;
    job->run = std::move(run);
    job->result = std::move(result);
    queue_.push_back(job);
  }
  if (jobsPending_++ == 0) tsfn_.Ref(env);
  Hold();
  cv_.notify_one();
  return promise;
}

LONG Context::Lookup(uint32_t id, SCARDHANDLE *h) const {
  auto it = handles_.find(id);
  if (it == handles_.end()) return SCARD_E_INVALID_HANDLE;
  *h = it->second;
  return SCARD_S_SUCCESS;
}

Napi::Value Context::StartCancel(Napi::Env env) {
  auto *task = new CancelTask(env, this);  // deletes itself after OnOK / OnError
  auto promise = task->Promise();
  task->Queue();
  return promise;
}

// ---- calls -------------------------------------------------------------------------------------

Napi::Value Context::Open(const Napi::CallbackInfo &info) {
  return Enqueue(
      info.Env(), Kind::Call,
      [this]() -> LONG {
        if (established_) return SCARD_S_SUCCESS;
        SCARDCONTEXT c = 0;
        LONG rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, nullptr, nullptr, &c);
        if (rv != SCARD_S_SUCCESS) return rv;
        ctx_ = c;
        cancelCtx_.store(c);
        established_ = true;
        return rv;
      },
      nullptr, false);
}

Napi::Value Context::Close(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *job = new Job(env);
  auto promise = job->deferred.Promise();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      job->deferred.Resolve(env.Undefined());
      delete job;
      return promise;
    }
    closed_ = true;
    job->kind = Kind::Close;
    job->needsContext = false;
    job->run = [this]() -> LONG {
      ReleaseAll();
      return SCARD_S_SUCCESS;
    };
    queue_.push_back(job);
  }
  if (jobsPending_++ == 0) tsfn_.Ref(env);
  Hold();
  cv_.notify_one();
  // A wait in progress ends now instead of holding the release back until its timeout.
  (void)StartCancel(env);
  return promise;
}

Napi::Value Context::Cancel(const Napi::CallbackInfo &info) { return StartCancel(info.Env()); }

Napi::Value Context::ListReaders(const Napi::CallbackInfo &info) {
  auto names = std::make_shared<std::vector<std::string>>();
  return Enqueue(
      info.Env(), Kind::Call,
      [this, names]() -> LONG {
        // the list may grow between the size query and the read: retry a few times
        for (int attempt = 0; attempt < 4; attempt++) {
          DWORD len = 0;
          LONG rv = SCardListReaders(ctx_, nullptr, nullptr, &len);
          if (rv != SCARD_S_SUCCESS) return rv;
          std::vector<char> buf(len + 1, '\0');
          rv = SCardListReaders(ctx_, nullptr, buf.data(), &len);
          if (rv == SCARD_E_INSUFFICIENT_BUFFER) continue;
          if (rv != SCARD_S_SUCCESS) return rv;
          names->clear();
          for (size_t i = 0; i < len && buf[i] != '\0';) {
            std::string name(&buf[i]);
            i += name.size() + 1;
            names->push_back(std::move(name));
          }
          return SCARD_S_SUCCESS;
        }
        return SCARD_E_INSUFFICIENT_BUFFER;
      },
      [names](Napi::Env env) -> Napi::Value {
        auto a = Napi::Array::New(env, names->size());
        for (uint32_t i = 0; i < names->size(); i++) a.Set(i, Napi::String::New(env, (*names)[i]));
        return a;
      });
}

Napi::Value Context::Connect(const Napi::CallbackInfo &info) {
  Args a(info);
  std::string reader = a.str();
  DWORD share = a.u32(), protocols = a.u32();
  struct Out {
    uint32_t id = 0;
    DWORD protocol = 0;
  };
  auto out = std::make_shared<Out>();
  return Enqueue(
      info.Env(), Kind::Call,
      [this, reader, share, protocols, out]() -> LONG {
        SCARDHANDLE h = 0;
        DWORD active = 0;
        LONG rv = SCardConnect(ctx_, reader.c_str(), share, protocols, &h, &active);
        if (rv != SCARD_S_SUCCESS) return rv;
        while (nextHandle_ == 0 || handles_.count(nextHandle_) != 0) nextHandle_++;
        out->id = nextHandle_++;
        out->protocol = active;
        handles_[out->id] = h;
        return rv;
      },
      [out](Napi::Env env) -> Napi::Value {
        auto o = Napi::Object::New(env);
        o.Set("handle", Napi::Number::New(env, out->id));
        o.Set("protocol", Napi::Number::New(env, out->protocol));
        return o;
      });
}

Napi::Value Context::Reconnect(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  DWORD share = a.u32(), protocols = a.u32(), init = a.u32();
  auto protocol = std::make_shared<DWORD>(0);
  return Enqueue(
      info.Env(), Kind::Call,
      [this, id, share, protocols, init, protocol]() -> LONG {
        SCARDHANDLE h = 0;
        LONG rv = Lookup(id, &h);
        if (rv != SCARD_S_SUCCESS) return rv;
        return SCardReconnect(h, share, protocols, init, protocol.get());
      },
      [protocol](Napi::Env env) -> Napi::Value {
        auto o = Napi::Object::New(env);
        o.Set("protocol", Napi::Number::New(env, *protocol));
        return o;
      });
}

Napi::Value Context::Status(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  struct Out {
    char reader[MAX_READERNAME + 1] = {0};
    DWORD state = 0;
    DWORD protocol = 0;
    BYTE atr[MAX_ATR_SIZE] = {0};
    DWORD atrLen = MAX_ATR_SIZE;
  };
  auto out = std::make_shared<Out>();
  return Enqueue(
      info.Env(), Kind::Call,
      [this, id, out]() -> LONG {
        SCARDHANDLE h = 0;
        LONG rv = Lookup(id, &h);
        if (rv != SCARD_S_SUCCESS) return rv;
        DWORD readerLen = MAX_READERNAME;
        return SCardStatus(h, out->reader, &readerLen, &out->state, &out->protocol, out->atr, &out->atrLen);
      },
      [out](Napi::Env env) -> Napi::Value {
        auto o = Napi::Object::New(env);
        o.Set("reader", Napi::String::New(env, out->reader));
        o.Set("state", Napi::Number::New(env, out->state));
        o.Set("protocol", Napi::Number::New(env, out->protocol));
        o.Set("atr", Napi::Buffer<uint8_t>::Copy(env, out->atr, out->atrLen));
        return o;
      });
}

Napi::Value Context::Transmit(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  DWORD protocol = a.u32();
  auto send = std::make_shared<SecretBytes>();
  a.bytes(send->b);
  if (send->b.empty() || send->b.size() > MAX_BUFFER_SIZE_EXTENDED)
    throw Napi::RangeError::New(info.Env(), "argument 2: a command APDU of 1 to " + std::to_string(MAX_BUFFER_SIZE_EXTENDED) + " bytes expected");
  auto recv = std::make_shared<SecretBytes>();
  return Enqueue(
      info.Env(), Kind::Call,
      [this, id, protocol, send, recv]() -> LONG {
        SCARDHANDLE h = 0;
        LONG rv = Lookup(id, &h);
        if (rv != SCARD_S_SUCCESS) return rv;
        const SCARD_IO_REQUEST *pci;
        switch (protocol) {
          case SCARD_PROTOCOL_T0: pci = SCARD_PCI_T0; break;
          case SCARD_PROTOCOL_T1: pci = SCARD_PCI_T1; break;
          case SCARD_PROTOCOL_RAW: pci = SCARD_PCI_RAW; break;
          default: return SCARD_E_INVALID_VALUE;
        }
        recv->b.assign(MAX_BUFFER_SIZE_EXTENDED, 0);
        DWORD len = static_cast<DWORD>(recv->b.size());
        rv = SCardTransmit(h, pci, send->b.data(), static_cast<DWORD>(send->b.size()), nullptr, recv->b.data(), &len);
        wipe(send->b);
        if (rv != SCARD_S_SUCCESS) return rv;
        if (len > recv->b.size()) return SCARD_E_INSUFFICIENT_BUFFER;
        recv->b.resize(len);  // the tail stays in capacity and is wiped with the rest
        return rv;
      },
      [recv](Napi::Env env) -> Napi::Value { return Napi::Buffer<uint8_t>::Copy(env, recv->b.data(), recv->b.size()); });
}

Napi::Value Context::BeginTransaction(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  return Enqueue(info.Env(), Kind::Call, [this, id]() -> LONG {
    SCARDHANDLE h = 0;
    LONG rv = Lookup(id, &h);
    if (rv != SCARD_S_SUCCESS) return rv;
    return SCardBeginTransaction(h);
  });
}

Napi::Value Context::EndTransaction(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  DWORD disposition = a.u32();
  return Enqueue(info.Env(), Kind::Call, [this, id, disposition]() -> LONG {
    SCARDHANDLE h = 0;
    LONG rv = Lookup(id, &h);
    if (rv != SCARD_S_SUCCESS) return rv;
    return SCardEndTransaction(h, disposition);
  });
}

Napi::Value Context::Disconnect(const Napi::CallbackInfo &info) {
  Args a(info);
  uint32_t id = a.u32();
  DWORD disposition = a.u32();
  return Enqueue(info.Env(), Kind::Call, [this, id, disposition]() -> LONG {
    SCARDHANDLE h = 0;
    LONG rv = Lookup(id, &h);
    if (rv != SCARD_S_SUCCESS) return rv;
    handles_.erase(id);  // unusable afterwards, whatever SCardDisconnect says
    return SCardDisconnect(h, disposition);
  });
}

Napi::Value Context::GetStatusChange(const Napi::CallbackInfo &info) {
  Args a(info);
  Napi::Array readers = a.array();
  Napi::Array current = a.array();
  DWORD timeout = a.u32();
  if (readers.Length() != current.Length() || readers.Length() == 0)
    throw Napi::RangeError::New(info.Env(), "readers and current states: two non-empty arrays of the same length expected");
  struct State {
    std::vector<std::string> names;
    std::vector<SCARD_READERSTATE> states;
  };
  auto st = std::make_shared<State>();
  for (uint32_t i = 0; i < readers.Length(); i++) {
    Napi::Value n = readers.Get(i), c = current.Get(i);
    if (!n.IsString() || !c.IsNumber()) throw Napi::TypeError::New(info.Env(), "reader names (strings) and states (numbers) expected");
    st->names.push_back(n.As<Napi::String>().Utf8Value());
  }
  st->states.resize(st->names.size());
  for (uint32_t i = 0; i < st->names.size(); i++) {
    std::memset(&st->states[i], 0, sizeof(SCARD_READERSTATE));
    st->states[i].szReader = st->names[i].c_str();
    st->states[i].dwCurrentState = current.Get(i).As<Napi::Number>().Uint32Value();
  }
  return Enqueue(
      info.Env(), Kind::Wait,
      [this, timeout, st]() -> LONG { return SCardGetStatusChange(ctx_, timeout, st->states.data(), static_cast<DWORD>(st->states.size())); },
      [st](Napi::Env env) -> Napi::Value {
        auto arr = Napi::Array::New(env, st->states.size());
        for (uint32_t i = 0; i < st->states.size(); i++) {
          const SCARD_READERSTATE &s = st->states[i];
          auto o = Napi::Object::New(env);
          o.Set("eventState", Napi::Number::New(env, s.dwEventState));
          DWORD atrLen = s.cbAtr <= MAX_ATR_SIZE ? s.cbAtr : 0;
          o.Set("atr", Napi::Buffer<uint8_t>::Copy(env, s.rgbAtr, atrLen));
          arr.Set(i, o);
        }
        return arr;
      });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Context", Context::Define(env));
  return exports;
}

}  // namespace

NODE_API_MODULE(pcsc_lite, Init)
