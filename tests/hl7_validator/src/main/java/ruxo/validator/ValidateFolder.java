package ruxo.validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import com.google.gson.Gson;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

/**
 * Validates every *.json file of a folder (one FHIR R4 resource each) with the HL7 validator
 * engine, offline: core definitions and value sets from hapi-fhir-validation-resources-r4, no
 * terminology server. Prints one JSON object per file on stdout:
 * {"file": NAME, "valid": BOOL, "issues": [{"severity", "location", "message", "id"}]}.
 * valid = no issue of severity error or fatal.
 */
public final class ValidateFolder {
  private ValidateFolder() {}

  public static void main(String[] args) throws IOException {
    if (args.length != 1) {
      System.err.println("usage: ValidateFolder DIR");
      System.exit(2);
    }
    FhirContext ctx = FhirContext.forR4();
    ValidationSupportChain chain = new ValidationSupportChain(
        new DefaultProfileValidationSupport(ctx),
        new CommonCodeSystemsTerminologyService(ctx),
        new InMemoryTerminologyServerValidationSupport(ctx),
        new SnapshotGeneratingValidationSupport(ctx));
    FhirInstanceValidator instanceValidator = new FhirInstanceValidator(chain);
    instanceValidator.setAnyExtensionsAllowed(true);
    instanceValidator.setNoTerminologyChecks(false);
    FhirValidator validator = ctx.newValidator();
    validator.registerValidatorModule(instanceValidator);

    List<Path> files;
    try (Stream<Path> s = Files.list(Paths.get(args[0]))) {
      files = s.filter(p -> p.toString().endsWith(".json")).sorted().collect(Collectors.toList());
    }
    Gson gson = new Gson();
    for (Path file : files) {
      String text = Files.readString(file, StandardCharsets.UTF_8);
      JsonObject out = new JsonObject();
      out.addProperty("file", file.getFileName().toString());
      JsonArray issues = new JsonArray();
      boolean valid = true;
      try {
        ValidationResult result = validator.validateWithResult(text);
        for (SingleValidationMessage m : result.getMessages()) {
          ResultSeverityEnum sev = m.getSeverity();
          if (sev == ResultSeverityEnum.ERROR || sev == ResultSeverityEnum.FATAL) {
            valid = false;
          }
          JsonObject issue = new JsonObject();
          issue.addProperty("severity", sev == null ? "?" : sev.getCode());
          issue.addProperty("location", m.getLocationString());
          issue.addProperty("message", m.getMessage());
          issue.addProperty("id", m.getMessageId());
          issues.add(issue);
        }
      } catch (RuntimeException e) {
        valid = false;
        JsonObject issue = new JsonObject();
        issue.addProperty("severity", "fatal");
        issue.addProperty("location", "");
        issue.addProperty("message", e.toString());
        issue.addProperty("id", "exception");
        issues.add(issue);
      }
      out.addProperty("valid", valid);
      out.add("issues", issues);
      System.out.println(gson.toJson(out));
    }
  }
}
