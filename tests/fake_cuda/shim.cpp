// The native half of the fake-CUDA lane (tests/fake_cuda): lets a CPU-only process hold
// tensors whose C++ device is cuda:N, so that autograd and device checks behave as on a GPU.
//
// 1. A device guard for the CUDA device type (8 devices, one default stream each, events that
//    do nothing). Autograd asks it for streams of every cuda input.
// 2. CUDA hooks registered with the highest priority before torch loads: "built" (so torch's
//    accelerator is CUDA and autograd follows CUDA's stream rules), every device "has a primary
//    context", and pinned host memory is CPU memory whose pointers are remembered, so that
//    `Tensor.pin_memory()` / `is_pinned()` work as they do on a CUDA machine.
// Data never lives on a GPU: the Python half (device.py) keeps each tensor's values in a CPU
// tensor and computes there.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <mutex>
#include <unordered_set>

namespace {
using namespace c10;

constexpr DeviceIndex kDevices = 8;

struct FakeCudaGuard final : impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device d) const override { Device old = getDevice(); current = d.index(); return old; }
  Device getDevice() const override { return Device(DeviceType::CUDA, current); }
  void setDevice(Device d) const override { current = d.index(); }
  void uncheckedSetDevice(Device d) const noexcept override { current = d.index(); }
  Stream getStream(Device d) const noexcept override { return Stream(Stream::DEFAULT, d); }
  Stream getDefaultStream(Device d) const override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const noexcept override { return s; }
  DeviceIndex deviceCount() const noexcept override { return kDevices; }
  void record(void**, const Stream&, const DeviceIndex, const EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  // one device per process (the lane gives each rank its own), so a process-wide index
  static std::atomic<DeviceIndex> current;
};
std::atomic<DeviceIndex> FakeCudaGuard::current{0};

std::mutex pinned_mutex;
std::unordered_set<const void*> pinned;

void free_pinned(void* ptr) {
  {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    pinned.erase(ptr);
  }
  c10::free_cpu(ptr);
}

struct PinnedHostAllocator final : Allocator {
  DataPtr allocate(size_t n) override {
    void* ptr = c10::alloc_cpu(n);
    {
      std::lock_guard<std::mutex> lock(pinned_mutex);
      pinned.insert(ptr);
    }
    return {ptr, ptr, &free_pinned, Device(DeviceType::CPU)};
  }
  DeleterFnPtr raw_deleter() const override { return &free_pinned; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
PinnedHostAllocator pinned_allocator;

struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  void init() const override {}
  DeviceIndex deviceCount() const override { return kDevices; }
  DeviceIndex getCurrentDevice() const override { return FakeCudaGuard::current; }
  void setCurrentDevice(DeviceIndex d) const override { FakeCudaGuard::current = d; }
  bool isPinnedPtr(const void* data) const override {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    return pinned.count(data) > 0;
  }
  Allocator* getPinnedMemoryAllocator() const override { return &pinned_allocator; }
};

FakeCudaGuard guard;
}  // namespace

namespace at {
C10_REGISTER_TYPED_CLASS_WITH_PRIORITY(CUDAHooksRegistry, "CUDAHooks", c10::REGISTRY_PREFERRED, FakeCUDAHooks);
}

// Called from Python once torch is imported, with this process's device index (the guard registry is filled by torch's own
// libraries at load time; this replaces the CUDA entry, or fills it on CPU-only builds).
extern "C" void psft_fake_cuda_register_guard(int device_index) {
  FakeCudaGuard::current = static_cast<c10::DeviceIndex>(device_index);
  c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)].store(&guard);
}
