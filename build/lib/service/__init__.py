"""tdx-control-plane: schedules Intel TDX VMs onto hosts that opted in to TDX at kvm_intel load."""

__version__ = "0.1.0"
