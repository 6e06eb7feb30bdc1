# Warnings, sanitizers and CPU tuning shared by every FineServe target.
add_library(fs_flags INTERFACE)
target_compile_options(fs_flags INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align
                            -Wunused -Woverloaded-virtual -Wformat=2>
  # GCC 12 reports false -Wrestrict positives inside libstdc++'s std::string at -O3 (GCC PR 105329).
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>>:-Wno-restrict>)
if(FINESERVE_WERROR)
  target_compile_options(fs_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
endif()
target_include_directories(fs_flags INTERFACE ${PROJECT_SOURCE_DIR})
target_link_libraries(fs_flags INTERFACE Threads::Threads OpenMP::OpenMP_CXX)

if(FINESERVE_NATIVE)
  target_compile_options(fs_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-march=native>)
endif()

if(FINESERVE_SANITIZE)
  set(_san -fsanitize=${FINESERVE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(fs_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_san}>)
  target_link_options(fs_flags INTERFACE ${_san})
  # -O1 and line tables only (-g1: symbolized stack traces keep file:line): what the ASan docs
  # recommend, and less than half the compile time of RelWithDebInfo's -O2 -g, which dominated CI.
  # After the build type's flags on the command line, so these win.
  target_compile_options(fs_flags INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-O1 -g1>)
  # Sanitizer instrumentation confuses GCC's flow analysis into false -Wmaybe-uninitialized reports
  # (e.g. inside std::regex); the Release build keeps the warning.
  target_compile_options(fs_flags INTERFACE $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>>:-Wno-maybe-uninitialized>)
endif()

# fs_add_library(NAME DIR [DEPS ...]): one static library per layer from every .cpp under DIR
# (cuda/ and fuzz-only sources excluded), so adding a source file needs no CMake edit.
function(fs_add_library name dir)
  cmake_parse_arguments(ARG "" "" "DEPS;EXCLUDE" ${ARGN})
  file(GLOB_RECURSE _srcs CONFIGURE_DEPENDS ${dir}/*.cpp)
  list(FILTER _srcs EXCLUDE REGEX "/cuda/")
  foreach(_ex IN LISTS ARG_EXCLUDE)
    list(FILTER _srcs EXCLUDE REGEX "${_ex}")
  endforeach()
  if(_srcs)
    add_library(${name} STATIC ${_srcs})
    target_link_libraries(${name} PUBLIC fs_flags ${ARG_DEPS})
  else()  # a layer with no sources yet still has its dependencies
    add_library(${name} INTERFACE)
    target_link_libraries(${name} INTERFACE fs_flags ${ARG_DEPS})
  endif()
endfunction()
