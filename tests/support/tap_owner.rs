//! A local user's attempt to attach a client's TAP by name, shared by the tests of the
//! TAP's ownership (tests/hardening.rs through the broker, tests/linux_backend.rs on the
//! backend alone).
#![allow(dead_code)]

/// Opens /dev/net/tun as root (it is 0600 on some hosts; what is tested is the TAP's own
/// check), then, in a child process with no capability left, becomes `uid`/`gid` and
/// asks to attach TAP `name` (TUNSETIFF) as another local user would. Returns 0 on
/// success, else the errno. The child inherits the calling thread's network namespace.
pub fn attach_by_name_as(name: &str, uid: u32, gid: u32) -> i32 {
    // SAFETY: ifreq is plain old data (integers, byte arrays and a union of them), for
    // which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    let path = c"/dev/net/tun";
    // SAFETY: the child makes only async-signal-safe system calls on memory prepared
    // before the fork, then _exits; the parent only waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see the fork above; `req`, `path` and `gid` are live and valid.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                libc::_exit(200);
            }
            if libc::syscall(libc::SYS_setgroups, 1, &gid) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                libc::_exit(201);
            }
            if libc::ioctl(fd, libc::TUNSETIFF, &req) == 0 {
                libc::_exit(0);
            }
            libc::_exit(*libc::__errno_location());
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, writing its status into a live int.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child status {status}");
    let code = libc::WEXITSTATUS(status);
    assert!(code < 200, "the child could not set up (code {code})");
    code
}
