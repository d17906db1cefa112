// kloop's native gRPC front end: gRPC's C++ server moves the bytes, Python decides.
//
// Why: a grpc.aio server spends most of a small request's CPU inside the Python binding (the
// trivial grpc.aio server, which parses nothing, tops out at ~4.3 k req/s on a 2-core box where
// the same load generator reaches 10-13 k against nginx). Here HTTP/2 framing, flow control and
// status/trailer writing run on C++ threads without the GIL; Python sees each call once, as
// (handle, method, request bytes, seconds left), in batches drained on one eventfd wake-up, and
// answers with respond(handle, code, details, response bytes).
//
// Nothing here knows the OIP v2 protocol: every method goes through one generic service, so
// parsing, validation, error mapping and the model stay in Python (serving/grpc_native.py).
//
// Threads: the completion-queue thread (Run) requests calls, reads each request and deletes
// finished calls; the writer thread (WriteAnswers) starts the writes of Python's answers; the
// Python event loop polls and responds. docs/serving.md has the measurements behind this shape.
//
// Lifetime: a Call is created before it is requested and deleted on the completion-queue thread
// once its Finish completed. While Python holds it, no operation is pending on it. Python's
// handles are looked up in `live_` under the lock before use, so a stale or repeated handle is
// refused, never dereferenced. Stop() answers every call Python still holds with UNAVAILABLE,
// then shuts the server down and drains the queue.
#include <pybind11/pybind11.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;
using Clock = std::chrono::system_clock;

namespace {

constexpr int kUnavailable = 14;

class Front;

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

  std::string TakeRequest() {
    std::vector<grpc::Slice> slices;
    std::string out;
    if (request.Dump(&slices).ok()) {
      out.reserve(request.Length());
      for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
    request.Clear();
    return out;
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
  // (handle, method, request bytes, seconds left or None).
  py::list Poll() {
    uint64_t count;
    ssize_t n = read(efd_, &count, sizeof count);  // reset the wake-up; EAGAIN when none
    (void)n;
    std::vector<Call*> calls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      calls.swap(ready_);
    }
    py::list out;
    const auto now = Clock::now();
    for (Call* call : calls) {
      std::string body = call->TakeRequest();  // the CQ thread no longer touches a held call
      const auto deadline = call->ctx.deadline();
      py::object left = py::none();
      if (deadline != Clock::time_point::max()) {
        left = py::float_(std::chrono::duration<double>(deadline - now).count());
      }
      out.append(py::make_tuple(reinterpret_cast<uintptr_t>(call), py::str(call->ctx.method()),
                                py::bytes(body), left));
    }
    return out;
  }

  // The Python loop: answer a call it got from poll(). The writer thread starts the write
  // (gRPC writes in the thread that starts a write: HTTP/2 framing and the send syscall;
  // measured, doing that on the event loop took a third of its time on a tiny model). False
  // if the handle is not held (answered before, or by stop()).
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
    }
    py::gil_scoped_release release;
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
    std::vector<Outgoing> batch;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(out_mu_);
        out_cv_.wait(lock, [this] { return !out_.empty() || quit_; });
        if (out_.empty()) return;  // quit_, and everything written
        batch.swap(out_);
      }
      for (auto& o : batch) o.call->Answer(o.code, o.details, std::move(o.payload));
      batch.clear();
    }
  }

  // The completion-queue thread: requests calls, reads each request, deletes finished calls.
  void Run() {
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

  void Arrived(Call* call) {
    bool refuse, wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      refuse = stopping_;
      if (!refuse) {
        call->state = Call::State::kHeld;
        live_.insert(call);
        wake = ready_.empty();  // else the loop was woken and has not polled yet
        ready_.push_back(call);
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
      .def("stop", &Front::Stop, py::arg("grace") = 0.0);
  m.attr("GRPC_VERSION") = grpc::Version();
}
