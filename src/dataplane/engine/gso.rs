//! UDP segmentation offload on the engine's UDP sockets: a run of
//! same-sized datagrams of one flow travels as one buffer. With `UDP_GRO`
//! on a socket the kernel hands over such a run whole (a client's or a
//! backend's `UDP_SEGMENT` send, or what the NIC's GRO merged), with the
//! segment size in a control message; the engine passes it on as one
//! `sendmsg` carrying `UDP_SEGMENT`, and the kernel (or the NIC) cuts it
//! into the same datagrams again. One receive and one send per run instead
//! of per datagram; the receivers see exactly the datagrams that were sent.

use std::os::fd::RawFd;

// The parser below reads a cmsghdr's fields at their 64-bit Linux offsets.
const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() == 16);

/// Bytes of control-message room for one `int` (`CMSG_SPACE(4)`): what
/// a `UDP_GRO` receive or a `UDP_SEGMENT` send carries.
// SAFETY: CMSG_SPACE is arithmetic on its argument.
pub const CMSG_ROOM: usize = unsafe { libc::CMSG_SPACE(4) } as usize;

/// A control-message buffer, aligned for `cmsghdr`.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct Cmsg([u8; CMSG_ROOM]);

impl Cmsg {
    /// Writes one `UDP_SEGMENT` message of segment size `seg`; returns the
    /// length for `msg_controllen`.
    pub fn segment(&mut self, seg: u16) -> usize {
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        let len = unsafe { libc::CMSG_LEN(2) } as usize;
        let hdr = libc::cmsghdr {
            cmsg_len: len as _,
            cmsg_level: libc::SOL_UDP,
            cmsg_type: libc::UDP_SEGMENT,
        };
        let h = std::mem::size_of::<libc::cmsghdr>();
        // SAFETY: the buffer is CMSG_SPACE(4) >= size_of(cmsghdr) + 2 bytes,
        // aligned for cmsghdr; the kernel reads a u16 for UDP_SEGMENT.
        unsafe {
            std::ptr::write(self.0.as_mut_ptr().cast::<libc::cmsghdr>(), hdr);
            std::ptr::write_unaligned(self.0.as_mut_ptr().add(h).cast::<u16>(), seg);
        }
        CMSG_ROOM
    }

    /// The buffer, for `msg_control`.
    pub fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// Turns on `UDP_GRO` for `fd`: runs of datagrams arrive whole, with their
/// segment size in a control message (see [`segment_size`]).
pub fn enable_gro(fd: RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is a live socket of the caller; the value is a c_int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The segment size a `UDP_GRO` control message in `control` (the control
/// bytes of a received message) gives, if any: the payload is then a run of
/// datagrams of that size, the last one possibly shorter.
pub fn segment_size(control: &[u8]) -> Option<u16> {
    let h = std::mem::size_of::<libc::cmsghdr>();
    let field = |b: &[u8], at: usize| -> Option<[u8; 4]> { b.get(at..at + 4)?.try_into().ok() };
    let mut rest = control;
    while rest.len() >= h {
        // The bytes may not be aligned for cmsghdr: its fields by value.
        let len = usize::from_ne_bytes(rest.get(..8)?.try_into().ok()?);
        let level = i32::from_ne_bytes(field(rest, 8)?);
        let kind = i32::from_ne_bytes(field(rest, 12)?);
        let data = rest.get(h..len)?;
        if level == libc::SOL_UDP && kind == libc::UDP_GRO {
            // The kernel writes an int.
            let size = i32::from_ne_bytes(field(data, 0)?);
            return u16::try_from(size).ok().filter(|&s| s > 0);
        }
        // Next message: lengths are padded to the alignment of cmsghdr.
        rest = rest.get((len + 7) & !7..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let h = std::mem::size_of::<libc::cmsghdr>();
        let len = h + data.len();
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&level.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        v.resize((len + 7) & !7, 0);
        v
    }

    #[test]
    fn the_gro_segment_size_is_found_among_control_messages() {
        let gro = message(libc::SOL_UDP, libc::UDP_GRO, &1400i32.to_ne_bytes());
        assert_eq!(segment_size(&gro), Some(1400));
        let other = message(libc::SOL_IP, libc::IP_TOS, &[0x10]);
        let both: Vec<u8> = other.iter().chain(&gro).copied().collect();
        assert_eq!(segment_size(&both), Some(1400));
        assert_eq!(segment_size(&other), None);
        assert_eq!(segment_size(&[]), None);
        // A length running past the bytes, or a zero size: none.
        let mut bad = gro.clone();
        bad[0] = 200;
        assert_eq!(segment_size(&bad), None);
        let zero = message(libc::SOL_UDP, libc::UDP_GRO, &0i32.to_ne_bytes());
        assert_eq!(segment_size(&zero), None);
    }

    #[test]
    fn a_segment_message_reads_back_as_written() {
        let mut c = Cmsg::default();
        assert_eq!(c.segment(1200), CMSG_ROOM);
        let h = std::mem::size_of::<libc::cmsghdr>();
        assert_eq!(usize::from_ne_bytes(c.0[..8].try_into().unwrap()), h + 2);
        assert_eq!(
            i32::from_ne_bytes(c.0[8..12].try_into().unwrap()),
            libc::SOL_UDP
        );
        assert_eq!(
            i32::from_ne_bytes(c.0[12..16].try_into().unwrap()),
            libc::UDP_SEGMENT
        );
        assert_eq!(u16::from_ne_bytes(c.0[h..h + 2].try_into().unwrap()), 1200);
    }
}
