//! The one way this library reports misuse and unrecoverable failure: a single line on
//! stderr naming the function and the broken precondition, then `abort()`.
//!
//! Everything here is async-signal-safe: the message is formatted into a buffer on the
//! stack (no allocation, no stdio lock) and written with one raw `write(2)`.

use core::fmt::{self, Write};

/// A fixed-size, stack-allocated formatting buffer; text past its end is dropped.
pub struct LineBuf {
    buf: [u8; 512],
    len: usize,
}

impl LineBuf {
    pub const fn new() -> Self {
        LineBuf {
            buf: [0; 512],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes `memsnap: <function>: <message>` and a newline to stderr.
pub fn print_line(function: &str, args: fmt::Arguments<'_>) {
    let mut line = LineBuf::new();
    let _ = write!(line, "memsnap: {function}: ");
    let _ = line.write_fmt(args);
    if line.len == line.buf.len() {
        line.len -= 1;
    }
    let _ = line.write_str("\n");
    crate::sys::write_stderr(line.as_bytes());
}

/// Reports a broken precondition or an unrecoverable state, then aborts the process.
#[cold]
pub fn fatal(function: &str, args: fmt::Arguments<'_>) -> ! {
    print_line(function, args);
    crate::sys::abort()
}

/// `fatal!("Function", "format {}", args)`.
#[macro_export]
macro_rules! fatal {
    ($func:expr, $($arg:tt)*) => {
        $crate::fatal::fatal($func, format_args!($($arg)*))
    };
}
