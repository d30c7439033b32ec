// Runs header_only.cpp's CallEveryFunction (a TU that sees only memsnap's headers) in a
// forked child: every exported function is called at least once in a valid sequence.
#include "test_support.h"

namespace mozilla {
namespace recordreplay {
int CallEveryFunction();
}
}  // namespace mozilla

TEST(Header, EveryFunctionCallableFromHeaderOnlyTranslationUnit) {
  EXPECT_EXIT({ _exit(mozilla::recordreplay::CallEveryFunction() == 0 ? 0 : 1); },
              ::testing::ExitedWithCode(0), "Default: 2 hits");
}
