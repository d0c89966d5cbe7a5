"""Emulated aarch64 phone: TVM's aarch64 runtime under qemu-user behind a tracker-registered
RPC server, so phone deployment and tuning can be tested without a phone.

Importing this package needs neither qemu nor the cross compiler; they are checked when an
emulator or session is started.
"""
