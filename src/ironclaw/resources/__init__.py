"""What a sandbox is made of on the host: cgroups, network namespace and firewall, egress
proxy, registry, processes, tap devices, the watchdog and the guest bundle.

Below the backends and the manager, so both can use them; nothing here knows about a
particular backend. Standard library only in this file: the egress proxy imports the
package inside its unprivileged bundle.
"""
