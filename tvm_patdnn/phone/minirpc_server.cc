// Emulated-phone RPC server for tvm_patdnn.
//
// Why this exists: no phone is attached to CI, so we run TVM's own aarch64 runtime
// (libtvm_runtime.so from the PyPI aarch64 wheel) under qemu-user.  The Python-side
// `tvm.rpc.with_minrpc` does not work with the PyPI wheel, so this small main serves the
// runtime's full RPC endpoint ("rpc.ServerLoop") over two file descriptors.
//
// Usage:  minirpc_server [WORKDIR] READ_FD WRITE_FD
//   The two trailing fds are what `tvm.rpc.PopenSession` (rpc.CreatePipeClient) appends.
//   They may also be one and the same connected socket (the tracker-facing proxy does that).
//   WORKDIR, if given, is owned by the caller; otherwise a private temp dir is created and
//   removed again when this process ends (even by SIGKILL, which is how PopenSession ends).
//
// Only the tvm-ffi C ABI (through its header-only C++ wrappers) crosses into the
// prebuilt libraries, so the compiler's C++ ABI need not match the wheel's.

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

namespace {

namespace ffi = tvm::ffi;

ffi::Function RequireGlobal(const char* name) {
  std::optional<ffi::Function> f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) {
    std::cerr << "minirpc_server: the aarch64 TVM runtime lacks global function " << name
              << std::endl;
    std::exit(3);
  }
  return *f;
}

// Registers the two functions a TVM RPC server must provide on top of the runtime:
// where uploaded files live, and how to load an uploaded shared library.
void RegisterServerEnv(const std::string& workdir) {
  ffi::Function::SetGlobal(
      "tvm.rpc.server.workpath",
      ffi::Function::FromTyped([workdir](ffi::String name) -> ffi::String {
        return ffi::String(workdir + "/" + std::string(name));
      }),
      true);
  ffi::Function load_from_file = RequireGlobal("ffi.ModuleLoadFromFile");
  ffi::Function keep_alive = RequireGlobal("ffi.ModuleGlobalsAdd");
  ffi::Function::SetGlobal(
      "tvm.rpc.server.load_module",
      ffi::Function::FromTyped([workdir, load_from_file, keep_alive](ffi::String name) {
        ffi::Any mod = load_from_file(ffi::String(workdir + "/" + std::string(name)));
        // A dlclose while remote handles still point into the library would crash the
        // server; the process lives for one session only, so never unload.
        keep_alive(mod);
        return mod;
      }),
      true);
}

// Byte-stream callbacks for the runtime's CallbackChannel; plain read/write work on
// both pipes and sockets.
ffi::Function MakeSend(int fd) {
  return ffi::Function::FromTyped([fd](TVMFFIByteArray* data) -> int64_t {
    while (true) {
      ssize_t n = write(fd, data->data, data->size);
      if (n >= 0 || errno != EINTR) return static_cast<int64_t>(n);
    }
  });
}

ffi::Function MakeRecv(int fd) {
  return ffi::Function::FromTyped([fd](int64_t size) -> ffi::Bytes {
    std::vector<char> buf(static_cast<size_t>(size));
    while (true) {
      ssize_t n = read(fd, buf.data(), buf.size());
      if (n >= 0) return ffi::Bytes(buf.data(), static_cast<size_t>(n));
      if (errno != EINTR) {
        TVM_FFI_THROW(RuntimeError) << "minirpc_server: read failed, errno=" << errno;
      }
    }
  });
}

// PopenSession ends every session with SIGKILL (rpc.CreatePipeClient), so no exit path of
// ours runs. A forked janitor blocks on a pipe whose write end only we hold; when we die
// the read returns and it removes the private work directory.
void RemoveWorkdirAfterExit(const std::string& workdir, int read_fd, int write_fd) {
  int alive[2];
  if (pipe(alive) != 0) return;
  pid_t pid = fork();
  if (pid == 0) {
    setsid();  // stay out of signals aimed at the server's process group
    close(alive[1]);
    close(read_fd);  // the RPC client must see EOF when the server dies, not a live copy
    close(write_fd);
    char byte;
    while (read(alive[0], &byte, 1) < 0 && errno == EINTR) {
    }
    std::error_code ignored;
    std::filesystem::remove_all(workdir, ignored);
    _exit(0);
  }
  close(alive[0]);
}

}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 3 && argc != 4) {
    std::cerr << "usage: " << argv[0] << " [WORKDIR] READ_FD WRITE_FD" << std::endl;
    return 2;
  }
  // A client that disappears must end the session with an error, not kill us silently.
  signal(SIGPIPE, SIG_IGN);
  // Never outlive the process that started us (client or emulator proxy): no orphan qemu.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int read_fd = std::atoi(argv[argc - 2]);
  int write_fd = std::atoi(argv[argc - 1]);

  std::string workdir;
  if (argc == 3) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp ? tmp : "/tmp") + "/patdnn-phone-XXXXXX";
    std::vector<char> path(templ.begin(), templ.end());
    path.push_back('\0');
    if (mkdtemp(path.data()) == nullptr) {
      std::cerr << "minirpc_server: cannot create a work directory under " << templ << std::endl;
      return 2;
    }
    workdir = path.data();
    RemoveWorkdirAfterExit(workdir, read_fd, write_fd);
  } else {
    workdir = argv[1];
  }

  int code = 0;
  try {
    RegisterServerEnv(workdir);
    RequireGlobal("rpc.ServerLoop")(MakeSend(write_fd), MakeRecv(read_fd));
  } catch (const ffi::Error& err) {
    std::cerr << "minirpc_server: " << err.FullMessage() << std::endl;
    code = 1;
  }
  close(read_fd);
  if (write_fd != read_fd) close(write_fd);
  return code;
}
