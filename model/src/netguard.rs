//! Which callback addresses are refused: the SSRF guard.
//!
//! A callback URL must not let an instance owner make the deliverer call into the operator's own
//! networks. Loopback, private, link-local, CGNAT, multicast, reserved, documentation and
//! unspecified addresses are refused, in IPv4 and IPv6, including IPv4 addresses wrapped in IPv6
//! (IPv4-mapped, NAT64, 6to4). The operator may allow networks with `DELIVER_ALLOW_NETWORKS`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Networks the operator allows despite the guard (`DELIVER_ALLOW_NETWORKS`, a CIDR list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// Parses `10.0.0.0/8, 127.0.0.1/32, ::1/128`; a bare address counts as a single host.
    pub fn parse(raw: &str) -> Result<Self, String> {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{s}` is not a CIDR network such as 10.0.0.0/8"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Why `ip` may not be called, or `None` when it is a public unicast address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

/// `Ok` when `ip` is public or allowed; otherwise a sentence saying why not.
pub fn check(ip: IpAddr, allow: &AllowList) -> Result<(), String> {
    let embedded = embedded_v4(ip).map(IpAddr::V4);
    if allow.contains(ip) || embedded.is_some_and(|v4| allow.contains(v4)) {
        return Ok(());
    }
    match forbidden_reason(ip) {
        None => Ok(()),
        Some(reason) => Err(format!(
            "{ip} is a {reason} address; callbacks to it are refused unless DELIVER_ALLOW_NETWORKS allows it"
        )),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified (\"this network\")")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else if (a, b, c) == (192, 0, 0) {
        Some("IETF protocol assignment")
    } else if (a, b, c) == (192, 0, 2) || (a, b, c) == (198, 51, 100) || (a, b, c) == (203, 0, 113)
    {
        Some("documentation")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if (a, b, c) == (192, 88, 99) {
        Some("6to4 relay anycast")
    } else {
        None
    }
}

/// The IPv4 address wrapped in an IPv6 one: IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible
/// (`::/96`), NAT64 (`64:ff9b::/96`) or 6to4 (`2002::/16`).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let o = v6.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mapped_or_compatible =
        s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || (s[5] == 0 && s[6] != 0));
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if mapped_or_compatible || nat64 {
        Some(last32)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = embedded_v4(IpAddr::V6(ip)) {
        // An embedded public IPv4 address is as good as the address itself.
        return v4_reason(v4).map(|_| "IPv4-in-IPv6 form of a non-public");
    }
    if s[0] & 0xfe00 == 0xfc00 {
        Some("unique local (private)")
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if s[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        Some("local-use NAT64")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 || s[0] == 0x3fff && s[1] & 0xf000 == 0 {
        Some("documentation")
    } else if s[0] == 0x2001 && s[1] < 0x0200 {
        Some("IETF protocol assignment")
    } else if s[0] == 0x0100 && s[1..4] == [0, 0, 0] {
        Some("discard-only")
    } else if s[0] & 0xe000 != 0x2000 {
        // Everything outside 2000::/3 is not global unicast today.
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        check(s.parse().unwrap(), &AllowList::default()).is_err()
    }

    #[test]
    fn refuses_internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "2001:db8::1",
            "::10.0.0.1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn accepts_public_addresses() {
        for ip in [
            "8.8.8.8",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!refused(ip), "{ip} should be accepted");
        }
    }

    #[test]
    fn allow_list_wins() {
        let allow = AllowList::parse("127.0.0.0/8, ::1, 10.1.0.0/16").unwrap();
        assert!(check("127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(check("::1".parse().unwrap(), &allow).is_ok());
        assert!(check("::ffff:10.1.2.3".parse().unwrap(), &allow).is_ok());
        assert!(check("10.2.0.1".parse().unwrap(), &allow).is_err());
        assert!(AllowList::parse("10.0.0.0/33").is_err());
        let message = check("10.2.0.1".parse().unwrap(), &allow).unwrap_err();
        assert!(message.contains("DELIVER_ALLOW_NETWORKS"), "{message}");
    }
}
