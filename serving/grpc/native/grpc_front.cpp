// kloop's native gRPC front end: gRPC's C++ server moves the bytes, Python decides.
//
// Why: a grpc.aio server spends most of a small request's CPU inside the Python binding (the
// trivial grpc.aio server, which parses nothing, tops out at ~4.3 k req/s on a 2-core box where
// the same load generator reaches 10-13 k against nginx). Here HTTP/2 framing, flow control and
// status/trailer writing run on C++ threads without the GIL; Python sees each call once, as
// (handle, method, request bytes, seconds left), in batches drained on one eventfd wake-up, and
// answers with respond(handle, code, details, response bytes).
//
// Every method goes through one generic service, so parsing, validation, error mapping and the
// model stay in Python (serving/grpc/native/server.py), with one exception, the fast lane: Python
// may register routes (set_routes), each a model name and version whose requests it would run
// through one batcher. A ModelInfer whose bytes are exactly the common form for a route (its inputs
// in the manifest's order, each with its datatype and trailing dims, in raw_input_contents; no
// parameters, no requested outputs, no typed contents, no field this parser does not know) is
// parsed here on the completion-queue thread and handed to Python with the others for its route as
// one group (poll_groups): one concatenated buffer per input, so Python runs the group as a single
// batcher request, and respond_group writes each member's ModelInferResponse. Anything else,
// including every malformed request, takes the general path unchanged, so this parser only ever
// says "this one is simple", never "this one is wrong".
//
// Threads: the completion-queue thread (Run) requests calls, reads each request and deletes
// finished calls; the writer thread (WriteAnswers) starts the writes of Python's answers (a
// fast-lane group's are written on the loop's thread when the writer has none queued); the
// Python event loop polls and responds. docs/serving.md has the measurements behind this shape.
//
// Lifetime: a Call is created before it is requested and deleted on the completion-queue thread
// once its Finish completed. While Python holds it, no operation is pending on it. Python's
// handles are looked up in `live_` under the lock before use, so a stale or repeated handle is
// refused, never dereferenced. Stop() answers every call Python still holds with UNAVAILABLE,
// then shuts the server down and drains the queue.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;
using Clock = std::chrono::system_clock;
using Steady = std::chrono::steady_clock;  // CLOCK_MONOTONIC: Python's time.monotonic()

namespace {

constexpr int kUnavailable = 14;
constexpr const char* kModelInfer = "/inference.GRPCInferenceService/ModelInfer";

class Front;

// ---- the fast lane: protobuf wire format for the common ModelInfer ---------------------------
// (https://protobuf.dev/programming-guides/encoding/; field numbers from proto/inference.proto)

struct InputSpec {
  std::string name;
  std::string datatype;
  std::vector<int64_t> trailing;  // dims after the batch dimension, all fixed
  size_t row_bytes;               // bytes of one row of raw contents
};

struct OutputSpec {
  std::string name;
  std::string datatype;
};

struct Route {
  int64_t max_rows;  // a group never holds more rows; a bigger request takes the general path
  std::vector<InputSpec> inputs;
  std::string model;    // the answer's model_name and model_version
  std::string version;
  std::vector<OutputSpec> outputs;
};

struct Routes {
  int64_t generation = 0;
  std::vector<Route> list;  // a route's id is its position
  std::unordered_map<std::string, size_t> by_key;  // model + '\0' + version ("" = unversioned)
};

bool ReadVarint(const uint8_t*& p, const uint8_t* end, uint64_t* v) {
  uint64_t result = 0;
  for (int shift = 0; shift < 64 && p < end; shift += 7) {
    const uint8_t b = *p++;
    result |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = result;
      return true;
    }
  }
  return false;  // truncated, or longer than ten bytes
}

bool ReadDelimited(const uint8_t*& p, const uint8_t* end, std::string_view* out) {
  uint64_t n;
  if (!ReadVarint(p, end, &n) || n > static_cast<uint64_t>(end - p)) return false;
  *out = std::string_view(reinterpret_cast<const char*>(p), n);
  p += n;
  return true;
}

struct WireInput {
  std::string_view name, datatype;
  std::vector<int64_t> shape;
};

struct WireRequest {
  std::string_view model, version, id;
  std::vector<WireInput> inputs;
  std::vector<std::string_view> raw;
};

// InferInputTensor with name, datatype and shape only (packed or not); false for anything else.
bool ParseInput(std::string_view bytes, WireInput* in) {
  auto p = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto end = p + bytes.size();
  while (p < end) {
    uint64_t tag, v;
    if (!ReadVarint(p, end, &tag)) return false;
    const uint64_t field = tag >> 3, wire = tag & 7;
    if ((field == 1 || field == 2) && wire == 2) {
      if (!ReadDelimited(p, end, field == 1 ? &in->name : &in->datatype)) return false;
    } else if (field == 3 && wire == 0) {
      if (!ReadVarint(p, end, &v)) return false;
      in->shape.push_back(static_cast<int64_t>(v));
    } else if (field == 3 && wire == 2) {
      std::string_view packed;
      if (!ReadDelimited(p, end, &packed)) return false;
      auto q = reinterpret_cast<const uint8_t*>(packed.data());
      const auto qend = q + packed.size();
      while (q < qend) {
        if (!ReadVarint(q, qend, &v)) return false;
        in->shape.push_back(static_cast<int64_t>(v));
      }
    } else {
      return false;  // parameters, typed contents, or a field this parser does not know
    }
  }
  return true;
}

// ModelInferRequest with model_name, model_version, id, inputs and raw_input_contents only.
bool ParseRequest(std::string_view bytes, WireRequest* req) {
  auto p = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto end = p + bytes.size();
  while (p < end) {
    uint64_t tag;
    if (!ReadVarint(p, end, &tag) || (tag & 7) != 2) return false;
    std::string_view value;
    if (!ReadDelimited(p, end, &value)) return false;
    switch (tag >> 3) {
      case 1: req->model = value; break;  // a repeated singular field: the last one counts
      case 2: req->version = value; break;
      case 3: req->id = value; break;
      case 5:
        req->inputs.emplace_back();
        if (!ParseInput(value, &req->inputs.back())) return false;
        break;
      case 7: req->raw.push_back(value); break;
      default: return false;  // parameters, requested outputs, unknown fields
    }
  }
  return true;
}

void PutVarint(std::string* s, uint64_t v) {
  while (v >= 0x80) {
    s->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  s->push_back(static_cast<char>(v));
}

void PutDelimited(std::string* s, int field, const char* data, size_t n) {
  PutVarint(s, (static_cast<uint64_t>(field) << 3) | 2);
  PutVarint(s, n);
  s->append(data, n);
}

void PutString(std::string* s, int field, const std::string& v) {
  if (!v.empty()) PutDelimited(s, field, v.data(), v.size());  // proto3 omits empty strings
}

// One output's bytes for a whole group: C-contiguous, dim 0 = the group's rows.
struct GroupOutput {
  const char* data;
  std::vector<int64_t> trailing;
  size_t row_bytes;
};

// A member's ModelInferResponse, field by field in number order as protobuf writes it.
std::string SerializeResponse(const Route& route, const std::string& id, int64_t first_row,
                              int64_t rows, const std::vector<GroupOutput>& outputs) {
  std::string out, tensor, shape;
  PutString(&out, 1, route.model);
  PutString(&out, 2, route.version);
  PutString(&out, 3, id);
  for (size_t i = 0; i < outputs.size(); ++i) {
    tensor.clear();
    shape.clear();
    PutString(&tensor, 1, route.outputs[i].name);
    PutString(&tensor, 2, route.outputs[i].datatype);
    PutVarint(&shape, rows);
    for (int64_t d : outputs[i].trailing) PutVarint(&shape, d);
    PutDelimited(&tensor, 3, shape.data(), shape.size());
    PutDelimited(&out, 5, tensor.data(), tensor.size());
  }
  for (const auto& o : outputs) {
    PutDelimited(&out, 6, o.data + first_row * o.row_bytes, rows * o.row_bytes);
  }
  return out;
}

// One RPC: requested -> its request read -> held by Python -> answered -> finished -> deleted.
// Every step but "held by Python" runs on the completion-queue thread.
struct Call {
  enum class State { kRequested, kReading, kHeld, kFinishing };
  explicit Call(Front* f) : front(f), stream(&ctx) {}
  Front* front;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer request;
  grpc::ByteBuffer response;
  State state = State::kRequested;
  std::string body;  // the request's bytes, flattened on the completion-queue thread
  // The fast lane (a ModelInfer in the common form for a route): where its parts are in body.
  int route = -1;
  int64_t generation = 0;
  int64_t rows = 0;
  std::string_view id;
  std::vector<std::string_view> raw;
  Steady::time_point arrived;

  void TakeRequest() {
    std::vector<grpc::Slice> slices;
    if (request.Dump(&slices).ok()) {
      body.reserve(request.Length());
      for (const auto& s : slices) body.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    request.Clear();
  }

  void Answer(int code, const std::string& details, std::string payload) {
    state = State::kFinishing;
    if (code == 0) {
      grpc::Slice slice(std::move(payload));
      response = grpc::ByteBuffer(&slice, 1);
      stream.WriteAndFinish(response, grpc::WriteOptions(), grpc::Status::OK, this);
    } else {
      stream.Finish(grpc::Status(static_cast<grpc::StatusCode>(code), details), this);
    }
  }
};

// Fast-lane calls for one route, polled together: Python runs them as one batcher request. The
// inputs are copied out at poll; the calls are only ever touched again after a check that they
// are still held (respond_group, fail_group).
struct Group {
  int route = -1;
  int64_t generation = 0;
  std::shared_ptr<const Routes> table;  // the table it was routed by, while it is current
  const Route* spec = nullptr;           // in `table`; null when the table moved on
  int64_t rows = 0;
  std::vector<Call*> calls;
  std::vector<int64_t> member_rows;
  std::vector<std::string> ids;
  std::vector<std::string> bodies;  // for the general path, should Python send them there
  py::list inputs;                  // a bytearray per input: the members' rows, concatenated
  py::list seconds_left;            // per member, None without a deadline
  py::list ages;                    // per member, seconds since its request arrived

  size_t size() const { return calls.size(); }
  py::list Handles() const {
    py::list out;
    for (Call* c : calls) out.append(reinterpret_cast<uintptr_t>(c));
    return out;
  }
  // (handle, request bytes, seconds left) per member, as poll() gives calls.
  py::list Requests() const {
    py::list out;
    for (size_t i = 0; i < calls.size(); ++i) {
      out.append(py::make_tuple(reinterpret_cast<uintptr_t>(calls[i]), py::bytes(bodies[i]),
                                seconds_left[i]));
    }
    return out;
  }
};

// The front end's threads only hand requests to the Python loop and answers to gRPC. As
// SCHED_BATCH (no privilege needed), a thread woken by such a hand-off does not preempt the
// thread running where it wakes (often the loop, which has the real work): it takes an idle
// core, or waits for the scheduler's tick. On the 2-core box this cut the server's CPU per
// request by about a sixth (fewer context switches; docs/serving.md). Best effort: where the
// policy is refused, the thread runs as before.
void NoWakeupPreemption() {
  sched_param param{};
  (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
}

struct Outgoing {
  Call* call;
  int code;
  std::string details;
  std::string payload;
};

class Front {
 public:
  Front(const std::string& address, bool reuse_port, int max_receive_bytes, int max_send_bytes) {
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
    grpc::ServerBuilder builder;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port ? 1 : 0);
    builder.SetMaxReceiveMessageSize(max_receive_bytes);
    builder.SetMaxSendMessageSize(max_send_bytes);
    builder.RegisterAsyncGenericService(&service_);
    cq_ = builder.AddCompletionQueue();
    {
      py::gil_scoped_release release;  // binding and starting gRPC's threads
      server_ = builder.BuildAndStart();
    }
    if (!server_ || port_ == 0) {
      server_.reset();
      cq_->Shutdown();
      void* tag;
      bool ok;
      while (cq_->Next(&tag, &ok)) {
      }
      close(efd_);
      throw std::runtime_error("gRPC could not bind " + address);
    }
    for (int i = 0; i < kPendingRequests; ++i) RequestOne();
    thread_ = std::thread([this] { Run(); });
    writer_ = std::thread([this] { WriteAnswers(); });
  }

  ~Front() {
    Stop(0.0);
    close(efd_);
  }

  int port() const { return port_; }
  int fd() const { return efd_; }

  // The Python loop: every call whose request arrived since the last poll, as
  // (handle, method, request bytes, seconds left or None); fast-lane calls come from
  // poll_groups instead.
  py::list Poll() {
    uint64_t count;
    ssize_t n = read(efd_, &count, sizeof count);  // reset the wake-up; EAGAIN when none
    (void)n;
    std::vector<Call*> calls;
    {
      std::lock_guard<std::mutex> lock(mu_);  // both lists at once, after the reset
      calls.swap(ready_);
      polled_fast_.insert(polled_fast_.end(), fast_ready_.begin(), fast_ready_.end());
      fast_ready_.clear();
    }
    py::list out;
    const auto now = Clock::now();
    for (Call* call : calls) {
      out.append(py::make_tuple(reinterpret_cast<uintptr_t>(call), py::str(call->ctx.method()),
                                py::bytes(call->body), SecondsLeft(call, now)));
      std::string().swap(call->body);
    }
    return out;
  }

  // The Python loop, after poll(): the fast-lane calls that poll() took, as groups of one
  // route in arrival order, each at most the route's max_rows rows.
  std::vector<std::unique_ptr<Group>> PollGroups() {
    std::vector<Call*> calls;
    std::shared_ptr<const Routes> routes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls.swap(polled_fast_);
      routes = routes_;
    }
    std::vector<std::unique_ptr<Group>> out;
    if (calls.empty()) return out;
    std::unordered_map<int, Group*> open;  // route id -> the group being filled
    const auto now = Clock::now();
    const auto steady_now = Steady::now();
    for (Call* call : calls) {
      auto it = open.find(call->route);
      Group* group = it == open.end() ? nullptr : it->second;
      // Routed by an older table: a group of its own, which Python sends down the general path.
      const Route* route =
          call->generation == routes->generation ? &routes->list[call->route] : nullptr;
      const int64_t max_rows = route == nullptr ? 0 : route->max_rows;
      if (group == nullptr || group->generation != call->generation ||
          group->rows + call->rows > max_rows) {
        out.push_back(std::make_unique<Group>());
        group = out.back().get();
        group->route = call->route;
        group->generation = call->generation;
        if (route != nullptr) {
          group->table = routes;
          group->spec = route;
        }
        open[call->route] = group;
      }
      group->calls.push_back(call);
      group->member_rows.push_back(call->rows);
      group->rows += call->rows;
      group->ids.emplace_back(call->id);
      group->seconds_left.append(SecondsLeft(call, now));
      group->ages.append(std::chrono::duration<double>(steady_now - call->arrived).count());
    }
    for (auto& group : out) {
      const size_t n_inputs = group->calls.front()->raw.size();
      for (size_t i = 0; i < n_inputs; ++i) {
        size_t total = 0;
        for (Call* c : group->calls) total += c->raw[i].size();
        // A bytearray: numpy views it writable, so torch takes it without a copy.
        auto joined = py::reinterpret_steal<py::bytearray>(
            PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total)));
        if (!joined) throw py::error_already_set();
        char* dst = PyByteArray_AS_STRING(joined.ptr());
        for (Call* c : group->calls) {
          std::memcpy(dst, c->raw[i].data(), c->raw[i].size());
          dst += c->raw[i].size();
        }
        group->inputs.append(std::move(joined));
      }
      for (Call* c : group->calls) {  // the views into body die with it
        c->raw.clear();
        c->id = {};
        group->bodies.push_back(std::move(c->body));
      }
    }
    return out;
  }

  // Python's fast-lane routes (see the top of this file), replacing the table; an empty list
  // turns the lane off. Calls routed by an older table arrive in groups of that generation.
  void SetRoutes(int64_t generation, const py::list& routes) {
    auto table = std::make_shared<Routes>();
    table->generation = generation;
    for (const auto& item : routes) {
      const auto t = item.cast<py::tuple>();
      Route route;
      const auto model = t[0].cast<std::string>(), version = t[1].cast<std::string>();
      if (t[2].cast<size_t>() != table->list.size()) {
        throw std::invalid_argument("route ids are the positions in the list: 0, 1, 2, ...");
      }
      route.max_rows = t[3].cast<int64_t>();
      for (const auto& in : t[4].cast<py::list>()) {
        const auto spec = in.cast<py::tuple>();
        InputSpec input{spec[0].cast<std::string>(), spec[1].cast<std::string>(),
                        spec[2].cast<std::vector<int64_t>>(), spec[3].cast<size_t>()};
        if (input.row_bytes == 0) throw std::invalid_argument("an input row has no bytes");
        route.inputs.push_back(std::move(input));
      }
      route.model = t[5].cast<std::string>();
      route.version = t[6].cast<std::string>();
      for (const auto& o : t[7].cast<py::list>()) {
        const auto spec = o.cast<py::tuple>();
        route.outputs.push_back({spec[0].cast<std::string>(), spec[1].cast<std::string>()});
      }
      if (route.max_rows < 1 || route.inputs.empty() || route.outputs.empty()) {
        throw std::invalid_argument("a route needs max_rows >= 1, inputs and outputs");
      }
      std::string key = model;
      key.push_back('\0');
      key += version;
      table->by_key.emplace(std::move(key), table->list.size());
      table->list.push_back(std::move(route));
    }
    std::lock_guard<std::mutex> lock(mu_);
    fast_on_ = !table->list.empty();
    routes_ = std::move(table);
  }

  // The Python loop: answer every member still held with its rows of `outputs` (one
  // C-contiguous buffer per route output, dim 0 = the group's rows). The number answered.
  size_t RespondGroup(const Group& group, const py::list& outputs) {
    const Route* route = group.spec;
    if (route == nullptr) {
      throw std::invalid_argument("the group was routed by a table that had changed: answer "
                                  "its members one by one");
    }
    if (outputs.size() != route->outputs.size()) {
      throw std::invalid_argument("one buffer per route output is needed");
    }
    std::vector<py::buffer_info> infos;
    std::vector<GroupOutput> parts;
    for (const auto& o : outputs) {
      infos.push_back(o.cast<py::buffer>().request());
      const auto& info = infos.back();
      if (info.ndim < 1 || info.shape[0] != group.rows) {
        throw std::invalid_argument("an output's dim 0 is not the group's rows");
      }
      GroupOutput part{static_cast<const char*>(info.ptr), {}, static_cast<size_t>(info.itemsize)};
      ssize_t stride = info.itemsize;
      for (ssize_t d = info.ndim - 1; d >= 0; --d) {  // C-contiguous, or refused
        if (info.shape[d] > 1 && info.strides[d] != stride) {
          throw std::invalid_argument("an output is not C-contiguous");
        }
        stride *= info.shape[d];
      }
      for (ssize_t d = 1; d < info.ndim; ++d) {
        part.trailing.push_back(info.shape[d]);
        part.row_bytes *= info.shape[d];
      }
      parts.push_back(std::move(part));
    }
    std::vector<Outgoing> answers;
    int64_t first = 0;
    std::vector<bool> held = TakeHeld(group.calls);
    for (size_t i = 0; i < group.calls.size(); ++i) {
      if (held[i]) {
        answers.push_back(Outgoing{group.calls[i], 0, {},
                                   SerializeResponse(*route, group.ids[i], first,
                                                     group.member_rows[i], parts)});
      }
      first += group.member_rows[i];
    }
    const size_t answered = answers.size();
    SendAll(std::move(answers));
    return answered;
  }

  // The Python loop: answer every member still held with the same status.
  size_t FailGroup(const Group& group, int code, const std::string& details) {
    std::vector<bool> held = TakeHeld(group.calls);
    std::vector<Outgoing> answers;
    for (size_t i = 0; i < group.calls.size(); ++i) {
      if (held[i]) answers.push_back(Outgoing{group.calls[i], code, details, {}});
    }
    const size_t answered = answers.size();
    SendAll(std::move(answers));
    return answered;
  }

  // The Python loop: answer a call it got from poll(). The writer thread starts the write
  // (gRPC writes in the thread that starts a write: HTTP/2 framing and the send syscall;
  // measured before the fast lane, when every call came here, doing that on the event loop
  // took a third of its time on a tiny model). False if the handle is not held (answered
  // before, or by stop()).
  bool Respond(uintptr_t handle, int code, const std::string& details, py::bytes payload) {
    Call* call = reinterpret_cast<Call*>(handle);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (live_.erase(call) == 0) return false;
    }
    Send(Outgoing{call, code, details, std::string(payload)});  // copied under the GIL
    return true;
  }

  // Refuse new calls, answer every held one with UNAVAILABLE, give answers being written
  // `grace` seconds, and shut down.
  void Stop(double grace) {
    std::vector<Call*> held;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      stopped_ = stopping_ = true;
      held.assign(live_.begin(), live_.end());  // polled or not (ready_ is a subset)
      live_.clear();
      ready_.clear();
      fast_ready_.clear();
      polled_fast_.clear();
    }
    py::gil_scoped_release release;
    {
      // Waits for a group being written on the loop's thread (stop() runs on another); any
      // later answers go to the writer, which writes them before it exits.
      std::lock_guard<std::mutex> lock(inline_mu_);
      inline_closed_ = true;
    }
    for (Call* call : held) Send(Outgoing{call, kUnavailable, "server is shutting down", {}});
    {
      std::lock_guard<std::mutex> lock(out_mu_);
      quit_ = true;
    }
    out_cv_.notify_one();
    writer_.join();  // every answer's write started
    server_->Shutdown(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(grace)));
    cq_->Shutdown();
    thread_.join();  // drains the queue: every call finished and deleted
    server_.reset();
  }

  size_t Held() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_.size();
  }

 private:
  static constexpr int kPendingRequests = 64;  // calls requested ahead of arrival

  void RequestOne() {
    Call* call = new Call(this);
    service_.RequestCall(&call->ctx, &call->stream, cq_.get(), cq_.get(), call);
  }

  static py::object SecondsLeft(Call* call, Clock::time_point now) {
    const auto deadline = call->ctx.deadline();
    if (deadline == Clock::time_point::max()) return py::none();
    return py::float_(std::chrono::duration<double>(deadline - now).count());
  }

  // Which of `calls` were held (each is no longer: the caller answers it).
  std::vector<bool> TakeHeld(const std::vector<Call*>& calls) {
    std::vector<bool> held(calls.size());
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < calls.size(); ++i) held[i] = live_.erase(calls[i]) > 0;
    return held;
  }

  // A group's answers (the Python loop, holding the GIL). With nothing queued for the writer,
  // they are written right here, the GIL released: handing them to the writer thread cost a
  // wake-up of another thread per group, on the critical path of every call (tiny model over
  // gRPC, alternating runs against the writer thread: ahead in 5 of 6 pairs at 8 clients, by
  // up to a quarter, and in both at one client; at 32 clients ahead in 5 of 9, even in 2,
  // behind in 2, although the loop now does the writes' framing; docs/serving.md). Otherwise
  // they queue behind the writer's, which writes them in its turn.
  void SendAll(std::vector<Outgoing> answers) {
    if (answers.empty()) return;
    bool queued;
    {
      std::lock_guard<std::mutex> lock(out_mu_);
      queued = !out_.empty();
    }
    if (!queued) {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(inline_mu_);
      if (!inline_closed_) {  // Stop() closes it before the server and its queue shut down
        Write(&answers);
        return;
      }
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(out_mu_);
      wake = out_.empty();
      for (auto& o : answers) out_.push_back(std::move(o));
    }
    if (wake) out_cv_.notify_one();
  }

  // Starts the writes (gRPC does the HTTP/2 framing and the send syscall in this thread).
  static void Write(std::vector<Outgoing>* answers) {
    for (auto& o : *answers) o.call->Answer(o.code, o.details, std::move(o.payload));
  }

  void Send(Outgoing o) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(out_mu_);
      wake = out_.empty();
      out_.push_back(std::move(o));
    }
    if (wake) out_cv_.notify_one();
  }

  // The writer thread: starts the writes of Python's answers (gRPC does the HTTP/2 framing and
  // the send syscall in the thread that starts a write). A condition variable wakes it within
  // microseconds; a grpc::Alarm on the completion queue went through gRPC's timer thread and
  // cost a lone client 0.4 ms per call.
  void WriteAnswers() {
    NoWakeupPreemption();
    std::vector<Outgoing> batch;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(out_mu_);
        out_cv_.wait(lock, [this] { return !out_.empty() || quit_; });
        if (out_.empty()) return;  // quit_, and everything written
        batch.swap(out_);
      }
      Write(&batch);
      batch.clear();
    }
  }

  // The completion-queue thread: requests calls, reads each request, deletes finished calls.
  void Run() {
    NoWakeupPreemption();
    void* tag;
    bool ok;
    while (cq_->Next(&tag, &ok)) {
      Call* call = static_cast<Call*>(tag);
      switch (call->state) {
        case Call::State::kRequested:
          if (!ok) {  // shutting down: this request slot will not be filled
            delete call;
            break;
          }
          if (!stopping_flag()) RequestOne();
          call->state = Call::State::kReading;
          call->stream.Read(&call->request, call);
          break;
        case Call::State::kReading:
          if (!ok) {  // the client half-closed without a request, or went away
            call->Answer(3 /* INVALID_ARGUMENT */, "no request message", {});
          } else {
            Arrived(call);
          }
          break;
        case Call::State::kHeld:  // not reached: a held call has no operation pending
          break;
        case Call::State::kFinishing:
          delete call;
          break;
      }
    }
  }

  // A ModelInfer in the common form for a route goes to the fast lane (see the top).
  void RouteFast(Call* call) {
    std::shared_ptr<const Routes> routes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!fast_on_) return;
      routes = routes_;
    }
    if (call->ctx.method() != kModelInfer) return;
    WireRequest req;
    if (!ParseRequest(call->body, &req)) return;
    std::string key(req.model);
    key.push_back('\0');
    key.append(req.version);
    const auto it = routes->by_key.find(key);
    if (it == routes->by_key.end()) return;
    const Route& route = routes->list[it->second];
    if (req.inputs.size() != route.inputs.size() || req.raw.size() != route.inputs.size()) return;
    for (unsigned char ch : req.id) {
      if (ch >= 0x80) return;  // UTF-8 beyond ASCII: Python checks it
    }
    int64_t rows = 0;
    for (size_t i = 0; i < route.inputs.size(); ++i) {
      const InputSpec& spec = route.inputs[i];
      const WireInput& in = req.inputs[i];
      if (in.name != spec.name || in.datatype != spec.datatype ||
          in.shape.size() != spec.trailing.size() + 1) {
        return;
      }
      if (i == 0) rows = in.shape[0];
      if (in.shape[0] != rows || rows < 1 || rows > route.max_rows) return;
      for (size_t d = 0; d < spec.trailing.size(); ++d) {
        if (in.shape[d + 1] != spec.trailing[d]) return;
      }
      if (req.raw[i].size() != static_cast<uint64_t>(rows) * spec.row_bytes) return;
    }
    call->route = static_cast<int>(it->second);
    call->generation = routes->generation;
    call->rows = rows;
    call->id = req.id;
    call->raw = std::move(req.raw);
  }

  void Arrived(Call* call) {
    call->TakeRequest();  // off the Python loop, and the fast lane reads it
    call->arrived = Steady::now();
    RouteFast(call);
    bool refuse, wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      refuse = stopping_;
      if (!refuse) {
        call->state = Call::State::kHeld;
        live_.insert(call);
        wake = ready_.empty() && fast_ready_.empty();  // else the loop was woken already
        (call->route >= 0 ? fast_ready_ : ready_).push_back(call);
      }
    }
    if (refuse) {
      call->Answer(kUnavailable, "server is shutting down", {});
      return;
    }
    if (wake) {  // Poll resets the eventfd before it takes ready_, so no wake-up is lost
      uint64_t one = 1;
      ssize_t n = write(efd_, &one, sizeof one);
      (void)n;
    }
  }

  bool stopping_flag() {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;
  int port_ = 0;
  int efd_ = -1;
  std::mutex mu_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::unordered_set<Call*> live_;  // handed to (or queued for) Python, not yet answered
  std::vector<Call*> ready_;        // arrived, not yet polled
  std::vector<Call*> fast_ready_;   // arrived for the fast lane, not yet polled
  std::vector<Call*> polled_fast_;  // taken by poll(), not yet grouped by poll_groups()
  std::shared_ptr<const Routes> routes_ = std::make_shared<Routes>();
  bool fast_on_ = false;  // routes_ is not empty
  std::mutex inline_mu_;  // held while the loop's thread writes a group's answers
  bool inline_closed_ = false;  // by Stop(): answers go to the writer only
  std::mutex out_mu_;
  std::vector<Outgoing> out_;  // answered by Python, not yet written
  std::condition_variable out_cv_;
  bool quit_ = false;
  std::thread writer_;
};

}  // namespace

PYBIND11_MODULE(_grpc_front, m) {
  m.doc() = "gRPC's C++ server as a byte mover for a Python event loop (kloop)";
  py::class_<Front>(m, "Front")
      .def(py::init<const std::string&, bool, int, int>(), py::arg("address"),
           py::arg("reuse_port") = false, py::arg("max_receive_bytes") = 4 << 20,
           py::arg("max_send_bytes") = -1)
      .def_property_readonly("port", &Front::port)
      .def_property_readonly("fd", &Front::fd, "eventfd: readable when calls have arrived")
      .def_property_readonly("held", &Front::Held, "calls arrived and not yet answered")
      .def("poll", &Front::Poll)
      .def("respond", &Front::Respond, py::arg("handle"), py::arg("code"), py::arg("details"),
           py::arg("payload"))
      .def("stop", &Front::Stop, py::arg("grace") = 0.0)
      .def("set_routes", &Front::SetRoutes, py::arg("generation"), py::arg("routes"),
           "fast-lane routes: [(model, version or '', route id, max rows, [(input, datatype, "
           "trailing dims, row bytes)], answer model, answer version, [(output, datatype)])]")
      .def("poll_groups", &Front::PollGroups,
           "after poll(): the fast-lane calls it took, grouped by route")
      .def("respond_group", &Front::RespondGroup, py::arg("group"), py::arg("outputs"))
      .def("fail_group", &Front::FailGroup, py::arg("group"), py::arg("code"),
           py::arg("details"));
  py::class_<Group>(m, "Group")
      .def_readonly("route", &Group::route)
      .def_readonly("generation", &Group::generation)
      .def_readonly("rows", &Group::rows)
      .def_readonly("member_rows", &Group::member_rows)
      .def_readonly("inputs", &Group::inputs)
      .def_readonly("seconds_left", &Group::seconds_left)
      .def_readonly("ages", &Group::ages)
      .def_property_readonly("handles", &Group::Handles)
      .def("requests", &Group::Requests)
      .def("__len__", &Group::size);
  m.attr("GRPC_VERSION") = grpc::Version();
}
