"""``tdx-agent``: reads a host's kvm_intel/TDX facts and reports them to the control plane."""
