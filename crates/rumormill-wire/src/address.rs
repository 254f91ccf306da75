use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::WireError;
use crate::proto::Address;

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        Address {
            ip,
            port: u32::from(a.port()),
        }
    }
}

/// Reads a socket address from the wire: 4 or 16 bytes of IP and a port that
/// fits 16 bits; anything else is an error.
///
/// ```
/// use rumormill_wire::{proto::Address, socket_addr};
/// let a: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
/// assert_eq!(socket_addr(Some(&Address::from(a))).unwrap(), a);
/// assert!(socket_addr(Some(&Address { ip: vec![1, 2, 3], port: 1 })).is_err());
/// ```
pub fn socket_addr(a: Option<&Address>) -> Result<SocketAddr, WireError> {
    let a = a.ok_or_else(|| WireError::Decode("missing address".into()))?;
    let port = u16::try_from(a.port).map_err(|_| WireError::Decode(format!("port {} out of range", a.port)))?;
    let ip = match a.ip.len() {
        4 => IpAddr::V4(Ipv4Addr::new(a.ip[0], a.ip[1], a.ip[2], a.ip[3])),
        16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&a.ip);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        n => return Err(WireError::Decode(format!("IP address of {n} bytes"))),
    };
    Ok(SocketAddr::new(ip, port))
}
