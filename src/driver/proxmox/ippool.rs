//! Static addresses for cloud-init's `ipconfig0`, from a range. Which addresses are in use is
//! read back from the VMs themselves (their `ipconfig0`), so the state lives in Proxmox; the
//! driver only adds in-process reservations for creates that have not written theirs yet.

use std::{collections::HashSet, net::Ipv4Addr};

/// An inclusive range of IPv4 addresses and what cloud-init needs with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpPool {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// Parses `"10.0.0.10-10.0.0.20"` (or a single address).
pub fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let first: Ipv4Addr = a.trim().parse().map_err(|_| format!("{:?} is not an IPv4 address", a.trim()))?;
    let last: Ipv4Addr = b.trim().parse().map_err(|_| format!("{:?} is not an IPv4 address", b.trim()))?;
    if u32::from(first) > u32::from(last) {
        return Err(format!("{first} comes after {last}"));
    }
    Ok((first, last))
}

impl IpPool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }

    pub fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// The lowest address of the pool not in `used`.
    pub fn pick(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }

    /// The `ipconfig0` value for `ip`.
    pub fn ipconfig(&self, ip: Ipv4Addr) -> String {
        match self.gateway {
            Some(gw) => format!("ip={ip}/{},gw={gw}", self.prefix_len),
            None => format!("ip={ip}/{}", self.prefix_len),
        }
    }
}

/// The static IPv4 address of an `ipconfig0` value (`ip=10.0.0.5/24,gw=10.0.0.1`), if any.
pub fn ipconfig_address(value: &str) -> Option<Ipv4Addr> {
    value.split(',').find_map(|kv| kv.trim().strip_prefix("ip=")).and_then(|cidr| cidr.split('/').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_reject_nonsense() {
        assert_eq!(
            parse_range("10.0.0.10-10.0.0.12").unwrap(),
            ("10.0.0.10".parse().unwrap(), "10.0.0.12".parse().unwrap())
        );
        assert!(parse_range("10.0.0.12-10.0.0.10").is_err());
        assert!(parse_range("10.0.0.x-10.0.0.10").is_err());
    }

    #[test]
    fn the_lowest_free_address_is_picked_and_rendered() {
        let (first, last) = parse_range("10.0.0.10-10.0.0.12").unwrap();
        let pool = IpPool { first, last, prefix_len: 24, gateway: Some("10.0.0.1".parse().unwrap()) };
        let used: HashSet<_> = ["10.0.0.10".parse().unwrap()].into();
        let ip = pool.pick(&used).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.11");
        assert_eq!(pool.ipconfig(ip), "ip=10.0.0.11/24,gw=10.0.0.1");
        let all: HashSet<_> = (10..=12).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(pool.pick(&all), None);
        assert_eq!(pool.size(), 3);
    }

    #[test]
    fn addresses_are_read_back_from_ipconfig() {
        assert_eq!(ipconfig_address("ip=10.0.0.5/24,gw=10.0.0.1"), Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(ipconfig_address("gw=10.0.0.1,ip=10.0.0.6/24"), Some(Ipv4Addr::new(10, 0, 0, 6)));
        assert_eq!(ipconfig_address("ip=dhcp"), None);
    }
}
